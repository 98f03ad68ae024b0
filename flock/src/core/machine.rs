//! [`Flock`]: discovery, SWIM/Lifeguard membership and leader election in one state machine.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{
    decode_frame, decode_message, encode_frame, encode_message, message_len, BootId, DecodeError,
    Header, Kind, LeaderClaim, MemberInfo, MemberState, Message, NodeId, PushPull, StreamFrame,
    Update, HEADER_BYTES, MAX_STREAM_BYTES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracing::{debug, trace};

use super::detect::{
    suspicion_timeout, Detection, Probe, Relay, Suspicion, CONFIRMATIONS_MAX, RELAYS_MAX,
};
use super::discovery::Discovery;
use super::dissemination::{Dissemination, FAST_PUSH_PULL_DIFF, FAST_PUSH_PULL_ROUNDS};
use super::keys::{Keys, SHUT_OUT_REQUESTS};
use super::leader::{election_tick, Leadership};
use super::secure::{decode_claim, encode_claim, Opened as SecOpened, Sec, SecurityTiming};
use super::table::{addr_key, member_hash, Table};
use super::timer::{Timer, Timers};
use super::wire::{Wire, ENVELOPE_OVERHEAD};
use super::{
    is_live, Command, DropReason, Event, Identity, LeaderView, Member, Outbox, Stats, Transmit,
    TransmitKind,
};
use crate::config::{bloc_tag, Config, ConfigError, PUSH_PULL_SCALE_MEMBERS};
use crate::crypto::{Joined, Keyring, KeyringOp, Purpose, SecretKey};

/// Room kept in the output queues once drained.
const OUTBOX_KEEP: usize = 64;

/// What [`Flock::open`] found.
enum Opened {
    Flock(Header, Vec<u8>),
    Request {
        request: Header,
        context: Vec<u8>,
        reply: Vec<u8>,
    },
    Joined(Joined),
    /// A handshake datagram to send to `to` (a cookie reply, or our request again with a cookie).
    Handshake {
        to: SocketAddr,
        payload: Vec<u8>,
        cookie_reply: bool,
    },
}

/// Most nodes a flock keeps revoked (each costs 8 bytes in every push-pull). Beyond it, rotate
/// the secondary key: a node without it cannot come back.
pub const REVOKED_MAX: usize = 1024;

/// The flock state machine. See the crate docs for the protocol.
///
/// `Flock` routes inputs (datagrams, stream frames, timers, commands) to the concern they belong
/// to; each concern keeps its state in its own sub-state type:
///
/// | field | type | file |
/// |---|---|---|
/// | `timers` | `Timers` | `timer.rs` |
/// | `detect` | `Detection` | `detect.rs` (probes, suspicion, Lifeguard) |
/// | `spread` | `Dissemination` | `dissemination.rs` (gossip, push-pull, digests) |
/// | `discovery` | `Discovery` | `discovery.rs` |
/// | `lead` | `Leadership` | `leader.rs` |
/// | `keys` | `Keys` | `keys.rs` (with `Sec`, `secure.rs`) |
/// | `wire` | `Wire` | `wire.rs` (sealing, opening, datagram budget) |
///
/// What every concern reads (the member table, this node's entry, the RNG, the outputs) stays
/// here.
pub struct Flock {
    config: Config,
    me: Identity,
    /// This node's own entry (state Alive, or Left once it left).
    self_member: Member,
    /// The one RNG: every random choice draws from it, in an order the simulator replays.
    rng: ChaCha8Rng,
    /// Every other member, with the live and dead sets and the live digest derived from them.
    members: Table,
    /// Nodes revoked by the flock (at most [`REVOKED_MAX`]): kept out of the table, their
    /// datagrams dropped.
    revoked: std::collections::BTreeSet<NodeId>,
    timers: Timers,
    detect: Detection,
    spread: Dissemination,
    discovery: Discovery,
    lead: Leadership,
    keys: Keys,
    wire: Wire,
    leaving: bool,
    left: bool,
    /// Time of the input being handled.
    now: Duration,
    stats: Stats,
    out: Outbox,
}

impl Flock {
    /// A node with security on: every datagram sealed, discovery by join handshake under the
    /// keyring's primary key, transient keys rotated by the leader. `rng_seed` must come from a
    /// cryptographically secure source (the agent draws it from the OS); the simulator derives it
    /// from its seed.
    pub fn new_secure(
        config: Config,
        identity: Identity,
        keyring: Keyring,
        security: SecurityTiming,
        rng_seed: [u8; 32],
        now: Duration,
    ) -> Result<Flock, ConfigError> {
        let mut flock = Flock::new(config, identity, 0, now)?;
        flock.rng = ChaCha8Rng::from_seed(rng_seed);
        flock.keys.sec = Some(Sec::new(
            &flock.config.bloc,
            flock.config.mtu,
            keyring,
            security,
            identity.id,
            identity.boot,
            identity.addr,
            now,
        ));
        Ok(flock)
    }

    /// The wall-clock time at `now` as this node stamps its join requests (None with security
    /// off).
    pub fn wall_clock(&self, now: Duration) -> Option<crate::crypto::Tai64N> {
        self.keys.sec.as_ref().map(|s| s.wall_at(now))
    }

    /// Sets the wall clock: `unix_nanos` nanoseconds since the Unix epoch at core time `now`.
    /// Drivers call it once, at their start; join requests carry the wall-clock time (counted on
    /// the core's monotonic `now` from there). Without it the boot id's start time stands in.
    pub fn set_wall_clock(&mut self, now: Duration, unix_nanos: u128) {
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.set_wall_clock(now, unix_nanos);
        }
    }

    /// Whether datagrams are sealed (a node built with [`Flock::new_secure`]).
    pub fn is_secure(&self) -> bool {
        self.keys.sec.is_some()
    }

    /// The transient key epoch this node seals with (None: no key yet, or security off).
    pub fn key_epoch(&self) -> Option<u32> {
        self.keys.sec.as_ref()?.own_epoch(self.now)
    }

    /// Transient key epochs held, oldest first.
    pub fn key_epochs(&self) -> Vec<u32> {
        self.keys
            .sec
            .as_ref()
            .map(|s| s.epochs())
            .unwrap_or_default()
    }

    /// The secondary keyring (None with security off).
    pub fn keyring(&self) -> Option<&Keyring> {
        self.keys.sec.as_ref().map(|s| &s.keyring)
    }

    /// A node that knows nobody yet, sending plain (unsealed) datagrams: for tests of the protocol
    /// alone. Agents use [`Flock::new_secure`]. It starts probing at once.
    pub fn new(
        config: Config,
        identity: Identity,
        seed: u64,
        now: Duration,
    ) -> Result<Flock, ConfigError> {
        config.validate()?;
        let self_member = Member {
            info: MemberInfo {
                id: identity.id,
                boot: identity.boot,
                addr: identity.addr,
                incarnation: 0,
                state: MemberState::Alive,
                key: identity.key,
            },
            since: now,
        };
        let mut flock = Flock {
            wire: Wire {
                bloc_tag: bloc_tag(&config.bloc),
                counter: 0,
                reply_cap: None,
            },
            config,
            me: identity,
            self_member,
            rng: ChaCha8Rng::seed_from_u64(seed),
            members: Table::default(),
            revoked: Default::default(),
            timers: Timers::default(),
            detect: Detection::default(),
            spread: Dissemination::default(),
            discovery: Discovery::default(),
            lead: Leadership::new(now),
            keys: Keys::default(),
            leaving: false,
            left: false,
            now,
            stats: Stats::default(),
            out: Outbox::default(),
        };

        // Spread the periodic work of many nodes started together.
        let t = flock.config.timing.clone();
        let jitter = |rng: &mut ChaCha8Rng, d: Duration| {
            Duration::from_nanos(rng.gen_range(0..d.as_nanos().max(1) as u64))
        };
        let first_probe = now + jitter(&mut flock.rng, t.probe_interval);
        flock.schedule(first_probe, Timer::Probe);
        let first_gossip = now + jitter(&mut flock.rng, t.gossip_interval);
        flock.schedule(first_gossip, Timer::Gossip);
        let first_pp =
            now + t.push_pull_fast_interval + jitter(&mut flock.rng, t.push_pull_fast_interval);
        flock.schedule(first_pp, Timer::PushPull);
        flock.schedule(now, Timer::Discovery);
        let first_dead = now + jitter(&mut flock.rng, t.dead_probe_interval);
        flock.schedule(first_dead, Timer::DeadProbe);
        flock.schedule(now + reap_period(&t), Timer::Reap);
        flock.schedule(now + election_tick(&t), Timer::Election);
        Ok(flock)
    }

    // ----- queries -------------------------------------------------------------------------

    /// Every member this node knows of, itself included.
    pub fn members(&self) -> impl Iterator<Item = Member> + '_ {
        std::iter::once(self.self_member).chain(self.members.iter())
    }

    /// One member (this node included).
    pub fn member(&self, id: NodeId) -> Option<Member> {
        if id == self.me.id {
            Some(self.self_member)
        } else {
            self.members.get(id)
        }
    }

    /// The leader this node follows.
    pub fn leader(&self) -> Option<LeaderView> {
        let claim = self.lead.claim?;
        let addr = self.member(claim.leader)?.info.addr;
        Some(LeaderView {
            id: claim.leader,
            addr,
            term: claim.term,
        })
    }

    /// The current leader claim, with its beat counter.
    pub fn leader_claim(&self) -> Option<LeaderClaim> {
        self.lead.claim
    }

    /// This node.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Live members (alive or suspect), this node included.
    pub fn live_count(&self) -> usize {
        self.members.live_len() + 1
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// True once a graceful leave has completed.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Lifeguard local-health score (0 = healthy).
    pub fn awareness(&self) -> u32 {
        self.detect.awareness
    }

    // ----- outputs -------------------------------------------------------------------------

    /// Next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.out.transmits.pop_front();
        if t.is_none() {
            self.out.transmits.shrink_to(OUTBOX_KEEP);
        }
        t
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.out.events.pop_front();
        if e.is_none() {
            // A push-pull that teaches N members emits N events at once: do not keep room for
            // N events ever after (the simulator holds every node's queues).
            self.out.events.shrink_to(OUTBOX_KEEP);
        }
        e
    }

    /// When [`Flock::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.left {
            return None;
        }
        self.timers.next_at()
    }

    // ----- inputs --------------------------------------------------------------------------

    /// A command from the application.
    pub fn handle_command(&mut self, now: Duration, cmd: Command) {
        self.now = now;
        if self.left {
            return;
        }
        match cmd {
            Command::Join(addrs) => {
                for addr in addrs {
                    if addr != self.me.addr {
                        self.send_discovery_ping(addr);
                    }
                }
            }
            Command::Leave => self.start_leave(now),
            Command::Keyring(op) => self.keyring_op(op, true, 0),
            Command::Revoke(id) => self.apply_revoke(now, id),
        }
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = now;
        while !self.left {
            let Some(timer) = self.timers.pop_due(now) else {
                break;
            };
            self.on_timer(now, timer);
        }
    }

    /// A datagram from the network.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.now = now;
        if bytes.len() > self.config.mtu {
            self.stats.drop(DropReason::Oversized);
            return;
        }
        let (header, body) = match self.open(from, bytes, false) {
            Ok(Opened::Flock(header, body)) => (header, body),
            Ok(Opened::Request {
                request,
                context,
                reply,
            }) => {
                self.on_handshake_request(now, from, request, context, reply);
                return;
            }
            Ok(Opened::Joined(joined)) => {
                self.on_joined(now, from, joined);
                return;
            }
            Ok(Opened::Handshake {
                to,
                payload,
                cookie_reply,
            }) => {
                if cookie_reply {
                    self.stats.cookies_sent += 1;
                    self.stats.drop(DropReason::UnderLoad);
                } else {
                    self.stats.cookies_received += 1;
                    self.stats.handshakes_sent += 1;
                }
                self.stats.datagrams_out += 1;
                self.stats.bytes_out += payload.len() as u64;
                self.out.transmits.push_back(Transmit {
                    to,
                    kind: TransmitKind::Datagram,
                    payload,
                });
                return;
            }
            Err(reason) => {
                let unreadable = matches!(
                    reason,
                    DropReason::UnknownKey | DropReason::AuthFailed | DropReason::StaleKey
                );
                if unreadable && self.members.id_at(&from).is_some() {
                    // A member is alive but seals under keys we do not hold: we missed a
                    // rotation, or it lives in another flock's keys (two flocks merging). A
                    // handshake with it settles which keys both sides use.
                    self.keys.hint = true;
                    self.handshake_unreadable(now, from);
                }
                self.stats.drop(reason);
                return;
            }
        };
        if self.left {
            self.stats.drop(DropReason::Unexpected);
            return;
        }
        self.note_peer_epoch(from, &header);
        self.follow_newer_key(now, &header);
        let msg = match decode_message(&body) {
            Ok(m) => m,
            Err(e) => {
                trace!(%from, error = %e, "malformed datagram");
                self.stats.drop(DropReason::Malformed);
                return;
            }
        };
        self.wire.reply_cap = Some((from, bytes.len(), header.sender));
        self.on_message(now, from, header, msg);
        self.wire.reply_cap = None;
    }

    /// A stream request from a peer; returns the reply frame.
    pub fn handle_stream(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<Vec<u8>> {
        self.now = now;
        let (header, frame) = self.open_stream(from, bytes)?;
        let sender = header.sender;
        if self.revoked.contains(&sender) {
            self.stats.drop(DropReason::Revoked);
            return None;
        }
        let answer = match frame {
            StreamFrame::PushPull(pp) => {
                let reply = !pp.reply;
                let ring_keys = self.ring_keys_for(pp.ring.as_ref());
                self.on_push_pull(now, sender, pp);
                reply.then(|| StreamFrame::PushPull(self.build_push_pull(true, false, ring_keys)))
            }
            StreamFrame::Probe { seq } => Some(StreamFrame::ProbeAck {
                seq,
                me: self.my_info(),
            }),
            StreamFrame::ProbeAck { .. } => {
                self.stats.drop(DropReason::Unexpected);
                return None;
            }
        };
        // Our reply carries our current entry: that answers any stale suspicion of us.
        self.detect.refute_pending = false;
        let frame = answer.filter(|_| !self.left)?;
        let body = encode_frame(&frame);
        // Answer under the key the request came in (the stream's source port is not the peer's
        // flock address, so look the sender up).
        let to = self.member(sender).map(|m| m.info.addr).unwrap_or(from);
        let sealed = self.seal_for(to, Some(sender), &body)?;
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += sealed.len() as u64;
        Some(sealed)
    }

    /// The reply to a stream request this node made to `from`.
    pub fn handle_stream_reply(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        self.now = now;
        let Some((header, frame)) = self.open_stream(from, bytes) else {
            return;
        };
        match frame {
            StreamFrame::PushPull(pp) => {
                self.detect.refute_pending = false;
                self.on_push_pull(now, header.sender, pp);
                self.answer_refutation(from);
            }
            StreamFrame::ProbeAck { seq, me } => {
                self.apply_sender(now, from, header, me);
                self.on_probe_ack(now, seq, header.sender);
            }
            StreamFrame::Probe { .. } => self.stats.drop(DropReason::Unexpected),
        }
    }

    /// A stream request to `to` failed (connect refused, timeout, reset).
    pub fn handle_stream_failed(&mut self, _now: Duration, to: SocketAddr) {
        debug!(%to, "stream failed");
    }

    // ----- envelope seam -------------------------------------------------------------------

    /// Seals a body for the node at `to`; None when this node holds no key to seal with (it
    /// must join), or knows no node at `to`.
    fn seal(&mut self, to: SocketAddr, body: &[u8]) -> Option<Vec<u8>> {
        self.seal_for(to, None, body)
    }

    /// Seals a body for node `recipient` (by default the node at `to`: the one last heard from
    /// there, or the member the table puts there) at `to`.
    fn seal_for(
        &mut self,
        to: SocketAddr,
        recipient: Option<NodeId>,
        body: &[u8],
    ) -> Option<Vec<u8>> {
        self.wire.counter += 1;
        let mut out = Vec::with_capacity(HEADER_BYTES + ENVELOPE_OVERHEAD + body.len());
        let Some(sec) = self.keys.sec.as_mut() else {
            let header = Header {
                kind: Kind::Flock,
                bloc_tag: self.wire.bloc_tag,
                key_id: 0,
                sender: self.me.id,
                boot: self.me.boot,
                counter: self.wire.counter,
            };
            header.write(&mut out);
            out.extend_from_slice(body);
            return Some(out);
        };
        let dest_epoch = self.keys.peer_epoch.get(&addr_key(&to)).copied();
        let member = self
            .members
            .id_at(&to)
            .map(|id| (id, self.members.is_live(id)));
        let Some(recipient) = recipient.or_else(|| sec.recipient(to, member)) else {
            self.stats.unsealed += 1;
            return None;
        };
        if sec.seal(
            self.now,
            self.wire.counter,
            dest_epoch,
            recipient,
            body,
            &mut self.rng,
            &mut out,
        ) {
            Some(out)
        } else {
            self.stats.unsealed += 1;
            None
        }
    }

    /// Opens a flock datagram or frame (plain mode: header checks only).
    fn open(&mut self, from: SocketAddr, bytes: &[u8], frame: bool) -> Result<Opened, DropReason> {
        if let Some(sec) = self.keys.sec.as_mut() {
            let mut out = Vec::new();
            if frame {
                let header = sec.open_frame(self.now, bytes, &mut out)?;
                return Ok(Opened::Flock(header, out));
            }
            let context = encode_claim(self.lead.claim.as_ref());
            return match sec.open_datagram(
                self.now,
                from,
                bytes,
                &mut self.wire.counter,
                &context,
                &mut self.rng,
                &mut out,
            )? {
                SecOpened::Flock(header) => Ok(Opened::Flock(header, out)),
                SecOpened::Request {
                    request,
                    context,
                    reply,
                } => Ok(Opened::Request {
                    request,
                    context,
                    reply,
                }),
                SecOpened::Joined(joined) => Ok(Opened::Joined(joined)),
                SecOpened::CookieReply { reply } => Ok(Opened::Handshake {
                    to: from,
                    payload: reply,
                    cookie_reply: true,
                }),
                SecOpened::Retry { to, request } => Ok(Opened::Handshake {
                    to,
                    payload: request,
                    cookie_reply: false,
                }),
            };
        }
        let (header, rest) = Header::parse(bytes).map_err(|e| match e {
            DecodeError::Truncated => DropReason::Truncated,
            _ => DropReason::BadMagic,
        })?;
        if header.bloc_tag != self.wire.bloc_tag {
            return Err(DropReason::WrongBloc);
        }
        if header.sender == self.me.id {
            return Err(DropReason::FromSelf);
        }
        if header.kind != Kind::Flock {
            return Err(DropReason::Unexpected);
        }
        Ok(Opened::Flock(header, rest.to_vec()))
    }

    /// Remembers which key a peer seals with, so that we answer under the same key.
    fn note_peer_epoch(&mut self, from: SocketAddr, header: &Header) {
        if self.keys.sec.is_some() {
            if self.keys.peer_epoch.len() >= self.config.members_max {
                self.keys.peer_epoch.clear();
            }
            self.keys.peer_epoch.insert(addr_key(&from), header.key_id);
        }
    }

    /// A member sealed under a key of our leader newer than ours: the leader switched to it.
    fn follow_newer_key(&mut self, now: Duration, header: &Header) {
        let Some(claim) = self.lead.claim.filter(|c| c.leader != self.me.id) else {
            return;
        };
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.follow_newer(header.key_id, claim.leader, now);
        }
    }

    fn open_stream(&mut self, from: SocketAddr, bytes: &[u8]) -> Option<(Header, StreamFrame)> {
        self.stats.streams_in += 1;
        self.stats.stream_bytes_in += bytes.len() as u64;
        if bytes.len() > MAX_STREAM_BYTES + HEADER_BYTES + ENVELOPE_OVERHEAD {
            self.stats.drop(DropReason::Oversized);
            return None;
        }
        let (header, body) = match self.open(from, bytes, true) {
            Ok(Opened::Flock(header, body)) => (header, body),
            Ok(_) => {
                self.stats.drop(DropReason::Malformed);
                return None;
            }
            Err(reason) => {
                self.stats.drop(reason);
                return None;
            }
        };
        if self.left {
            self.stats.drop(DropReason::Unexpected);
            return None;
        }
        match decode_frame(&body) {
            Ok(frame) => Some((header, frame)),
            Err(e) => {
                trace!(%from, error = %e, "malformed stream frame");
                self.stats.drop(DropReason::Malformed);
                None
            }
        }
    }

    /// Room for the body of one datagram.
    fn body_budget(&self) -> usize {
        self.config.mtu - HEADER_BYTES - ENVELOPE_OVERHEAD
    }

    /// The body size of the datagram being handled, if it came from `to` and `to` is not its
    /// sender's address in the table: an answer piggybacks no more than fits in that size.
    fn reply_body_cap(&self, to: SocketAddr) -> Option<usize> {
        let (from, len, sender) = self.wire.reply_cap?;
        if from != to || self.members.addr(sender) == Some(from) {
            return None;
        }
        Some(len.saturating_sub(HEADER_BYTES + ENVELOPE_OVERHEAD))
    }

    /// Room for the body of a datagram to `to`.
    fn room_for(&self, to: SocketAddr) -> usize {
        let budget = self.body_budget();
        self.reply_body_cap(to)
            .map_or(budget, |cap| cap.min(budget))
    }

    fn send(&mut self, to: SocketAddr, msg: &Message) {
        let mut body = Vec::with_capacity(256);
        encode_message(msg, &mut body);
        debug_assert!(
            body.len() <= self.body_budget(),
            "datagram over MTU: {msg:?}"
        );
        if self.reply_body_cap(to).is_some_and(|cap| body.len() > cap) {
            trace!(%to, len = body.len(), "answer to a foreign source larger than its request");
            return;
        }
        let Some(payload) = self.seal(to, &body) else {
            return;
        };
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += payload.len() as u64;
        self.out.transmits.push_back(Transmit {
            to,
            kind: TransmitKind::Datagram,
            payload,
        });
    }

    /// Fills `msg`'s update list with as many queued updates as fit (see
    /// [`Flock::reply_body_cap`]), then sends it.
    fn send_with_updates(&mut self, to: SocketAddr, mut msg: Message) {
        let fixed = message_len(&msg);
        // 3 bytes: room for the update count's varint to grow.
        let budget = self.room_for(to).saturating_sub(fixed + 3);
        let limit = self.retransmit_limit();
        let taken = self.spread.broadcasts.take(budget, limit);
        match &mut msg {
            Message::Ping { updates, .. }
            | Message::Ack { updates, .. }
            | Message::PingReq { updates, .. }
            | Message::IndirectPing { updates, .. }
            | Message::Gossip { updates } => *updates = taken,
            Message::Nack { .. } | Message::PushPull(_) => {}
        }
        self.send(to, &msg);
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.live_count() as f64;
        self.config.timing.retransmit_mult * ((n + 1.0).log10().ceil() as u32).max(1)
    }

    fn next_seq(&mut self) -> u32 {
        self.detect.seq = self.detect.seq.wrapping_add(1);
        self.detect.seq
    }

    fn my_info(&self) -> MemberInfo {
        self.self_member.info
    }

    // ----- timers --------------------------------------------------------------------------

    fn schedule(&mut self, at: Duration, timer: Timer) {
        self.timers.schedule(at, timer);
    }

    fn scaled(&self, d: Duration) -> Duration {
        d * (self.detect.awareness + 1)
    }

    fn on_timer(&mut self, now: Duration, timer: Timer) {
        let t = self.config.timing.clone();
        let t = &t;
        match timer {
            Timer::Probe => {
                let next = now + self.scaled(self.config.timing.probe_interval);
                self.schedule(next, Timer::Probe);
                if !self.leaving {
                    self.probe_round(now);
                }
            }
            Timer::ProbeTimeout { seq } => self.on_probe_timeout(now, seq),
            Timer::IndirectTimeout { seq } => self.on_indirect_timeout(now, seq),
            Timer::RelayTimeout { seq } => {
                if let Some(relay) = self.detect.relays.remove(&seq) {
                    self.send(relay.requester, &Message::Nack { seq: relay.seq });
                }
            }
            Timer::Suspicion { id, token } => self.on_suspicion_timeout(now, id, token),
            Timer::SuspectProbe { id, token } => {
                // While our own suspicion runs, keep probing the suspect (each probe carries the
                // suspicion to it: Lifeguard's buddy system), so that it can refute even if the
                // gossip of the suspicion never reached it (it was cut off when it started).
                let current = self.members.state(id) == Some(MemberState::Suspect)
                    && self
                        .detect
                        .suspicions
                        .get(&id)
                        .is_some_and(|s| s.started_token == token);
                if current && !self.leaving {
                    self.start_probe(now, id, false);
                    let next = now + self.scaled(t.probe_interval);
                    self.schedule(next, Timer::SuspectProbe { id, token });
                }
            }
            Timer::Gossip => {
                let next = now + t.gossip_interval;
                self.schedule(next, Timer::Gossip);
                self.gossip_round();
            }
            Timer::PushPull => {
                let next = now + self.push_pull_interval(now);
                self.schedule(next, Timer::PushPull);
                if !self.leaving {
                    if let Some(id) = self.members.choose_live(&mut self.rng) {
                        let addr = self.addr(id);
                        self.start_push_pull(addr, false);
                    }
                }
            }
            Timer::Discovery => {
                let alone = self.members.live_len() == 0;
                let next = now
                    + if alone {
                        t.discovery_interval_alone
                    } else {
                        t.discovery_interval
                    };
                self.schedule(next, Timer::Discovery);
                if !self.leaving {
                    self.discovery_round(alone);
                }
            }
            Timer::DeadProbe => {
                let next = now + t.dead_probe_interval;
                self.schedule(next, Timer::DeadProbe);
                if !self.leaving {
                    if let Some(id) = self.members.choose_dead(&mut self.rng) {
                        let addr = self.addr(id);
                        self.send_ping(addr, Some(id));
                    }
                }
            }
            Timer::Reap => {
                let next = now + reap_period(t);
                self.schedule(next, Timer::Reap);
                self.reap(now);
            }
            Timer::Beat { term } => {
                let next = now + t.leader_beat_interval;
                if let Some(claim) = self.lead.claim.as_mut() {
                    if claim.leader == self.me.id && claim.term == term && !self.leaving {
                        claim.beat += 1;
                        claim.epoch = self
                            .keys
                            .sec
                            .as_ref()
                            .and_then(|s| s.own_epoch(now))
                            .unwrap_or(0);
                        claim.ring = self.keys.sec.as_ref().map_or(0, |s| s.ring_version);
                        let claim = *claim;
                        self.spread.broadcasts.push(Update::Leader(claim));
                        self.schedule(next, Timer::Beat { term });
                    }
                }
            }
            Timer::Election => {
                let next = now + election_tick(t);
                self.schedule(next, Timer::Election);
                if !self.leaving {
                    self.check_leader(now);
                }
            }
            Timer::LeaveDone => {
                self.left = true;
                self.spread.broadcasts.clear();
                self.timers.clear();
                self.out.events.push_back(Event::LeaveComplete);
            }
        }
    }

    // ----- probing (SWIM + Lifeguard) ------------------------------------------------------

    fn probe_round(&mut self, now: Duration) {
        let Some(target) = self.next_probe_target() else {
            return;
        };
        self.start_probe(now, target, false);
    }

    fn next_probe_target(&mut self) -> Option<NodeId> {
        for _ in 0..2 {
            while self.detect.probe_next < self.detect.probe_order.len() {
                let id = self.detect.probe_order[self.detect.probe_next];
                self.detect.probe_next += 1;
                if self.members.is_live(id) {
                    return Some(id);
                }
            }
            // A new round over a fresh shuffle of the live members.
            self.detect.probe_order = self.members.live_ids().collect();
            for i in (1..self.detect.probe_order.len()).rev() {
                let j = self.rng.gen_range(0..=i);
                self.detect.probe_order.swap(i, j);
            }
            self.detect.probe_next = 0;
            if self.detect.probe_order.is_empty() {
                return None;
            }
        }
        None
    }

    fn start_probe(&mut self, now: Duration, target: NodeId, leader_check: bool) {
        let Some(info) = self.members.info(target) else {
            return;
        };
        let addr = info.addr;
        if info.state == MemberState::Suspect {
            // Lifeguard's buddy system: tell a suspect directly, so it can refute in time.
            let suspect = Update::Suspect {
                id: info.id,
                boot: info.boot,
                incarnation: info.incarnation,
                from: self.me.id,
            };
            self.send(
                addr,
                &Message::Gossip {
                    updates: vec![suspect],
                },
            );
        }
        let seq = self.next_seq();
        self.stats.probes += 1;
        self.detect.probes.insert(
            seq,
            Probe {
                target,
                sent: now,
                nacks_expected: 0,
                nacks: 0,
                leader_check,
            },
        );
        let msg = Message::Ping {
            seq,
            target: Some(target),
            me: self.my_info(),
            digest: self.digest(),
            updates: Vec::new(),
        };
        self.send_with_updates(addr, msg);
        let timeout = self.scaled(self.config.timing.probe_timeout);
        self.schedule(now + timeout, Timer::ProbeTimeout { seq });
    }

    fn on_probe_timeout(&mut self, now: Duration, seq: u32) {
        let Some(probe) = self.detect.probes.get(&seq) else {
            return; // acked
        };
        let target = probe.target;
        let sent = probe.sent;
        let Some(target_addr) = self.members.addr(target) else {
            self.detect.probes.remove(&seq);
            return;
        };
        let k = self.config.timing.indirect_probes;
        let relays = self.members.sample_live(k, &[target], &mut self.rng);
        for relay in &relays {
            let addr = self.addr(*relay);
            let msg = Message::PingReq {
                seq,
                target,
                target_addr,
                updates: Vec::new(),
            };
            self.send_with_updates(addr, msg);
        }
        if let Some(probe) = self.detect.probes.get_mut(&seq) {
            probe.nacks_expected = relays.len() as u32;
        }
        // And over a stream, as memberlist's TCP ping: a reliable transport does not lose the
        // probe or its answer, so loss alone does not make a live member suspect (and the flock
        // does not then spread the suspicion and its refutation to every member).
        self.send_frame(target_addr, &StreamFrame::Probe { seq });
        let t = &self.config.timing;
        let end = sent + self.scaled(t.probe_interval.max(t.probe_timeout * 2));
        let at = end.max(now + self.scaled(t.probe_timeout));
        self.schedule(at, Timer::IndirectTimeout { seq });
    }

    fn on_indirect_timeout(&mut self, now: Duration, seq: u32) {
        let Some(probe) = self.detect.probes.remove(&seq) else {
            return;
        };
        // Lifeguard: relays that did not even nack point at our own trouble.
        let missed = probe.nacks_expected.saturating_sub(probe.nacks);
        if missed > 0 {
            self.detect.awareness =
                (self.detect.awareness + missed.min(1)).min(self.config.timing.awareness_max);
        }
        let Some(info) = self.members.info(probe.target) else {
            return;
        };
        if !is_live(info.state) {
            return;
        }
        self.stats.probe_failures += 1;
        debug!(target = %info.id, leader_check = probe.leader_check, "probe failed");
        self.apply_suspect(now, info.id, info.boot, info.incarnation, self.me.id);
    }

    fn on_probe_ack(&mut self, now: Duration, seq: u32, from: NodeId) {
        let Some(probe) = self.detect.probes.get(&seq) else {
            return;
        };
        if probe.target != from {
            return; // the address now belongs to someone else: not an answer from the target
        }
        let probe = self.detect.probes.remove(&seq).expect("present");
        self.detect.awareness = self.detect.awareness.saturating_sub(1);
        if probe.leader_check || self.lead.claim.is_some_and(|c| c.leader == from) {
            self.lead.last_beat = now;
        }
    }

    fn send_ping(&mut self, addr: SocketAddr, target: Option<NodeId>) {
        let seq = self.next_seq();
        let msg = Message::Ping {
            seq,
            target,
            me: self.my_info(),
            digest: self.digest(),
            updates: Vec::new(),
        };
        self.send_with_updates(addr, msg);
    }

    /// Probes an address that is not a known member. With security on, that is a join
    /// handshake (sealed under the secondary key): it works before we hold any transient key,
    /// and it reaches flocks that formed apart under other transient keys.
    fn send_discovery_ping(&mut self, addr: SocketAddr) {
        if self.keys.sec.is_some() {
            self.send_handshake(addr, Purpose::Join);
        } else {
            self.send_ping(addr, None);
        }
    }

    fn send_handshake(&mut self, addr: SocketAddr, purpose: Purpose) {
        let context = encode_claim(self.lead.claim.as_ref());
        let now = self.now;
        self.wire.counter += 1;
        let counter = self.wire.counter;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let request = sec.start_handshake(now, counter, addr, purpose, &context, &mut self.rng);
        self.stats.handshakes_sent += 1;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += request.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: addr,
            kind: TransmitKind::Datagram,
            payload: request,
        });
    }

    /// We answered a handshake. A joiner from a flock that should win a merge makes us ask it
    /// for its keys in turn, so that both sides of a merge learn each other's keys.
    fn on_handshake_request(
        &mut self,
        _now: Duration,
        from: SocketAddr,
        request: Header,
        context: Vec<u8>,
        reply: Vec<u8>,
    ) {
        if self.revoked.contains(&request.sender) {
            self.stats.drop(DropReason::Revoked);
            return; // a revoked node gets no key
        }
        self.stats.handshakes_answered += 1;
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += reply.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: from,
            kind: TransmitKind::Datagram,
            payload: reply,
        });
        let theirs = decode_claim(&context);
        let better = match (theirs, self.lead.claim) {
            (Some(t), Some(ours)) => t.leader != ours.leader && t.precedence() > ours.precedence(),
            (Some(_), None) => true,
            _ => false,
        };
        let idle = self.keys.sec.as_ref().is_some_and(|s| {
            s.pending
                .as_ref()
                .is_none_or(|p| self.now >= p.started + self.config.timing.probe_timeout)
        });
        if better && idle && !self.leaving && request.sender != self.me.id {
            self.send_handshake(from, Purpose::Join);
        }
    }

    /// Our handshake was answered: we hold the responder's keys now.
    fn on_joined(&mut self, now: Duration, from: SocketAddr, joined: Joined) {
        self.stats.joins += 1;
        self.keys.unanswered_requests = 0;
        let responder = joined.header.sender;
        let theirs = decode_claim(&joined.context);
        let tag = theirs.map(|c| c.leader).unwrap_or(responder);
        let current = joined.keys.current.epoch;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let ours = self.lead.claim;
        let needs = sec.needs_key(now);
        let own = sec.own_epoch(now);
        // The same keys, by their bytes (epochs of flocks that split may coincide).
        let same_keys = own.is_some_and(|o| {
            (o == current && sec.holds_key(current, &joined.keys.current.key))
                || joined
                    .keys
                    .previous
                    .as_ref()
                    .is_some_and(|p| o == p.epoch && sec.holds_key(p.epoch, &p.key))
        });
        let same_leader = matches!((theirs, ours), (Some(t), Some(o)) if t.leader == o.leader);
        let switch = needs
            || (!same_keys
                && match (theirs, ours) {
                    (Some(t), Some(o)) => t.leader != o.leader && t.precedence() > o.precedence(),
                    (Some(_), None) => true,
                    (None, _) => false,
                });
        if !(switch || same_keys || same_leader) {
            // Another flock that should lose a merge: it asks us in turn (our request carried
            // our claim) and switches to our keys. Its keys are of no use to us.
            return;
        }
        // Whatever we lack of the two keys (a key we hold, or held and dropped, is left alone):
        // the same flock's responder may be a rotation ahead of us (our key is its previous one).
        if let Some(prev) = &joined.keys.previous {
            sec.install(prev.epoch, prev.key.clone(), tag, now, false);
        }
        let wanted = switch || [theirs, ours].iter().flatten().any(|c| c.epoch == current);
        sec.install(current, joined.keys.current.key.clone(), tag, now, wanted);
        // Same leader: which of its keys to seal with is the claim's to say
        // (sync_key_to_leader), never an answer from a member that may lag behind it; the
        // responder's claim is as good as a beat of it (we may have missed the one that named
        // the key we were missing).
        if switch {
            sec.set_own(current);
        }
        if switch {
            // Spread the key so that the rest of our flock can talk to the other side (a merge)
            // or, after a switch, follow us to the winning flock.
            let key = *joined.keys.current.key.as_bytes();
            self.spread.broadcasts.push(Update::Key {
                leader: tag,
                epoch: current,
                key,
            });
        }
        if self.keys.peer_epoch.len() >= self.config.members_max {
            self.keys.peer_epoch.clear();
        }
        self.keys.peer_epoch.insert(addr_key(&from), current);
        if let Some(claim) = theirs {
            self.lead.max_term = self.lead.max_term.max(claim.term);
            if same_leader {
                // The handshake does not carry the keyring version: keep the one we know.
                let ring = ours.map_or(0, |o| o.ring);
                self.apply_claim(now, LeaderClaim { ring, ..claim });
                self.sync_key_to_leader(now);
            }
        }
        if !self.leaving {
            self.start_push_pull(from, true);
        }
    }

    /// Seal with the newest key of the leader we follow. A member that holds none of its keys
    /// (it followed another leader, e.g. a solo one during boot) asks the leader for them.
    fn sync_key_to_leader(&mut self, now: Duration) {
        let Some(claim) = self.lead.claim else {
            return;
        };
        if claim.leader == self.me.id || claim.epoch == 0 {
            return;
        }
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if sec.holds(claim.epoch, now) {
            sec.follow_claim(claim.epoch, claim.leader, now);
        } else {
            self.keys.hint = true;
        }
    }

    /// Handshake with a member whose datagrams we cannot open, at most once per probe interval
    /// per address.
    fn handshake_unreadable(&mut self, now: Duration, from: SocketAddr) {
        let period = self.config.timing.probe_interval;
        if self
            .keys
            .unreadable
            .get(&from)
            .is_some_and(|t| now < *t + period)
            || self.leaving
        {
            return;
        }
        if self.keys.unreadable.len() >= 1024 {
            self.keys.unreadable.clear();
        }
        self.keys.unreadable.insert(from, now);
        self.send_handshake(from, Purpose::Join);
    }

    /// A member that holds no fresh key (missed rotations, partitioned, new) asks a member for
    /// it through the handshake, at most once per probe interval.
    fn request_key_if_needed(&mut self, now: Duration) {
        let Some(sec) = self.keys.sec.as_ref() else {
            return;
        };
        let hinted = std::mem::take(&mut self.keys.hint);
        if !(sec.needs_key(now) || hinted) || self.members.live_len() == 0 || self.leaving {
            return;
        }
        if self.lead.claim.is_some_and(|c| c.leader == self.me.id) {
            return; // the leader makes keys; it never asks for them
        }
        let busy = sec
            .pending
            .as_ref()
            .is_some_and(|p| now < p.started + self.config.timing.probe_interval);
        if busy {
            return;
        }
        // The leader surely holds its current key; anyone else may lag.
        let leader = self
            .lead
            .claim
            .map(|c| c.leader)
            .filter(|l| self.members.is_live(*l));
        if let Some(id) = leader.or_else(|| self.members.choose_live(&mut self.rng)) {
            let addr = self.addr(id);
            self.stats.key_requests += 1;
            self.keys.unanswered_requests += 1;
            self.send_handshake(addr, Purpose::KeyRequest);
            if self
                .keys
                .unanswered_requests
                .is_multiple_of(SHUT_OUT_REQUESTS)
            {
                // Members are there but none answers: our secondary keys are not in their
                // keyring any more (removed while we were away), or they are another bloc's.
                tracing::warn!(
                    requests = self.keys.unanswered_requests,
                    "shut out of the flock: no member accepts our secondary key (removed from the flock's keyring?); install a key the flock holds"
                );
            }
        }
    }

    /// The address of a member of the table.
    fn addr(&self, id: NodeId) -> SocketAddr {
        self.members.addr(id).expect("a member of the table")
    }

    /// The live-membership digest: XOR of [`member_hash`] over the live members and this node.
    fn digest(&self) -> u64 {
        member_hash(self.me.id, self.me.boot) ^ self.members.digest()
    }

    /// Leader: rotate the transient key when due, and announce it under the current one.
    fn rotate_if_leader(&mut self, now: Duration) {
        if self.lead.claim.is_none_or(|c| c.leader != self.me.id) || self.leaving {
            return;
        }
        let me = self.me.id;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        let r = sec.rotate_if_due(now, me, &mut self.rng);
        if let Some((epoch, key)) = r.announced.and_then(|e| Some((e, sec.key_bytes(e)?))) {
            self.stats.rotations += 1;
            debug!(epoch, "transient key made");
            self.spread.broadcasts.push(Update::Key {
                leader: me,
                epoch,
                key,
            });
        }
        if let Some(epoch) = r.switched {
            debug!(epoch, "sealing with the new transient key");
            if let Some(claim) = self.lead.claim.as_mut() {
                claim.epoch = epoch;
                claim.beat += 1;
                let claim = *claim;
                self.spread.broadcasts.push(Update::Leader(claim));
            }
        }
        if r.announced.is_some() || r.switched.is_some() {
            self.gossip_round();
        }
    }

    /// A transient key spread by gossip (rotation or merge).
    fn apply_key(&mut self, now: Duration, leader: NodeId, epoch: u32, key: [u8; 32]) {
        let following = self.lead.claim;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        // Only the keys of the leader we follow matter (and any key while we hold none): keys
        // of other leaders (solo leaders of a cold boot, a flock that lost a merge) would
        // otherwise circulate for ever, evicted and learnt again.
        let needs = sec.needs_key(now);
        if following.map(|c| c.leader) != Some(leader) && !needs {
            return;
        }
        let wanted = needs || following.is_some_and(|c| c.epoch == epoch);
        if !sec.install(epoch, SecretKey::from_bytes(key), leader, now, wanted) {
            return;
        }
        if needs || following.is_some_and(|c| c.epoch == epoch) {
            sec.set_own(epoch);
        }
        self.spread
            .broadcasts
            .push(Update::Key { leader, epoch, key });
    }

    /// A keyring change, from the operator (`local`) or spread by the flock.
    /// `version`: the ring version a spread change makes (ignored for the operator's own).
    fn keyring_op(&mut self, op: KeyringOp, local: bool, version: u64) {
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if !local && !sec.ring_change_is_news(version) {
            return; // already in our ring, or undone by a later change we hold
        }
        // "use" of a key not installed yet installs it first (gossip may reorder the steps).
        if let KeyringOp::Use(k) = &op {
            if !sec.keyring.contains(k) {
                let _ = sec.keyring.apply(&KeyringOp::Install(k.clone()));
            }
        }
        match sec.keyring.apply(&op) {
            Ok(changed) => {
                let (code, key) = match &op {
                    KeyringOp::Install(k) => (0u8, *k.as_bytes()),
                    KeyringOp::Use(k) => (1, *k.as_bytes()),
                    KeyringOp::Remove(k) => (2, *k.as_bytes()),
                };
                let version = match (local, changed) {
                    (true, true) => sec.next_ring_version(),
                    (true, false) => sec.ring_version,
                    (false, _) => {
                        sec.ring_changed_to(version);
                        version
                    }
                };
                if changed || local {
                    let update = Update::Keyring {
                        op: code,
                        key,
                        version,
                    };
                    self.spread.broadcasts.push(update);
                    if local {
                        // An operator's change goes to every live member at once (as Serf's key
                        // queries do); gossip and the retransmissions cover losses.
                        let targets: Vec<SocketAddr> =
                            self.members.live_ids().map(|id| self.addr(id)).collect();
                        for to in targets {
                            self.send(
                                to,
                                &Message::Gossip {
                                    updates: vec![update],
                                },
                            );
                        }
                    }
                }
                if changed {
                    self.out.events.push_back(Event::KeyringChanged);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, local, "keyring change refused");
                self.out
                    .events
                    .push_back(Event::KeyringRefused(e.to_string()));
            }
        }
    }

    fn discovery_round(&mut self, alone: bool) {
        self.discovery.round += 1;
        // While alone, every other round goes to a seed (or an address seen before).
        if alone && !self.config.seeds.is_empty() && (self.discovery.round % 2 == 1) {
            let i = (self.discovery.round / 2) as usize % self.config.seeds.len();
            let addr = self.config.seeds[i];
            if addr != self.me.addr {
                self.send_discovery_ping(addr);
                return;
            }
        }
        let port = self.me.addr.port();
        let size = self.config.space.size(port);
        if size == 0 {
            if alone && !self.config.seeds.is_empty() {
                let i = self.rng.gen_range(0..self.config.seeds.len());
                let addr = self.config.seeds[i];
                if addr != self.me.addr {
                    self.send_discovery_ping(addr);
                }
            }
            return;
        }
        let i = self.rng.gen_range(0..size);
        let Some(addr) = self.config.space.nth(i, port) else {
            return;
        };
        let live_there = self
            .members
            .id_at(&addr)
            .is_some_and(|id| self.members.is_live(id));
        if addr == self.me.addr || live_there {
            return; // a live member: nothing to discover there
        }
        // Unknown, or a member we hold dead: it may live on in another flock (with security on,
        // under other keys, which only a handshake gets across).
        self.send_discovery_ping(addr);
    }

    // ----- gossip and push-pull ------------------------------------------------------------

    fn gossip_round(&mut self) {
        if !self.spread.broadcasts.has_news() {
            return;
        }
        let targets =
            self.members
                .sample_live(self.config.timing.gossip_fanout, &[], &mut self.rng);
        for id in targets {
            if self.spread.broadcasts.is_empty() {
                break;
            }
            let addr = self.addr(id);
            self.send_with_updates(
                addr,
                Message::Gossip {
                    updates: Vec::new(),
                },
            );
        }
    }

    fn push_pull_interval(&self, now: Duration) -> Duration {
        let t = &self.config.timing;
        if now < self.spread.fast_push_pull_until {
            return t.push_pull_fast_interval;
        }
        let n = self.live_count();
        // Scale with N so that full-state bytes per node per second stay flat.
        let scale = (n as f64 / PUSH_PULL_SCALE_MEMBERS as f64).max(1.0);
        let base = t.push_pull_interval.mul_f64(scale);
        // ±10 % jitter keeps nodes from synchronising.
        let jitter = 0.9 + 0.2 * (self.wire.counter % 1000) as f64 / 1000.0;
        base.mul_f64(jitter)
    }

    /// `ring_keys`: the peer's keyring is behind ours (answer with our keys).
    fn build_push_pull(&self, reply: bool, join: bool, ring_keys: bool) -> PushPull {
        let members = self.members().map(|m| m.info).collect();
        PushPull {
            reply,
            join,
            members,
            leader: self.lead.claim,
            ring: self.keys.sec.as_ref().map(|s| s.ring_state(ring_keys)),
            revoked: self.revoked.iter().copied().collect(),
        }
    }

    fn start_push_pull(&mut self, addr: SocketAddr, join: bool) {
        self.stats.push_pulls += 1;
        let pp = self.build_push_pull(false, join, false);
        self.send_push_pull(addr, pp);
    }

    /// Sends a push-pull as a datagram when it fits (see [`Flock::reply_body_cap`]), else as a
    /// stream request.
    fn send_push_pull(&mut self, addr: SocketAddr, pp: PushPull) {
        let msg = Message::PushPull(pp);
        if message_len(&msg) <= self.room_for(addr) {
            self.send(addr, &msg);
            return;
        }
        let Message::PushPull(pp) = msg else {
            unreachable!("built above")
        };
        self.send_frame(addr, &StreamFrame::PushPull(pp));
    }

    /// Opens a stream to `addr` with `frame` as its request.
    fn send_frame(&mut self, addr: SocketAddr, frame: &StreamFrame) {
        let body = encode_frame(frame);
        let Some(payload) = self.seal(addr, &body) else {
            return;
        };
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += payload.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: addr,
            kind: TransmitKind::Stream,
            payload,
        });
    }

    fn on_push_pull(&mut self, now: Duration, sender: NodeId, pp: PushPull) {
        for id in pp.revoked.iter().take(REVOKED_MAX) {
            self.apply_revoke(now, *id);
        }
        let known_before = self.members.len();
        for info in &pp.members {
            match info.state {
                MemberState::Alive => self.apply_alive_from(now, *info, false),
                // As memberlist: a remote view of death only makes us suspect, and the
                // suspicion counts as ours (not as an independent confirmation by the sender).
                MemberState::Suspect | MemberState::Dead => {
                    if info.id != self.me.id && !self.members.contains(info.id) {
                        // A member new to us: learn it, but do not take over a suspicion we
                        // have no evidence of (the view may be stale; its owner's timers and
                        // the gossip about it decide).
                        let alive = MemberInfo {
                            state: MemberState::Alive,
                            ..*info
                        };
                        self.apply_alive_from(now, alive, false);
                        continue;
                    }
                    let me = self.me.id;
                    self.apply_suspect(now, info.id, info.boot, info.incarnation, me);
                }
                MemberState::Left => {
                    if !self.members.contains(info.id) && info.id != self.me.id {
                        continue; // nothing to learn about a node we never knew that left
                    }
                    self.apply_left(now, info.id, info.boot, info.incarnation);
                }
            }
        }
        if let Some(claim) = pp.leader {
            self.apply_claim(now, claim);
        }
        if let Some(ring) = &pp.ring {
            self.repair_ring_from(sender, ring, pp.reply);
        }
        // Adaptive anti-entropy: while two views still differ (one side taught the other a
        // member), keep push-pulling fast; once they agree, fall back to the scaled period.
        let learned = self.members.len().saturating_sub(known_before);
        let they_lack = (self.members.len() + 1).saturating_sub(pp.members.len());
        if learned + they_lack >= FAST_PUSH_PULL_DIFF {
            self.spread.fast_push_pull_until =
                now + self.config.timing.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        }
    }

    /// Whether a push-pull answer to a peer whose ring is `theirs` carries our keys (it is
    /// behind us).
    fn ring_keys_for(&self, theirs: Option<&crux_proto::flock::KeyringState>) -> bool {
        match (self.keys.sec.as_ref(), theirs) {
            (Some(sec), Some(theirs)) => sec.ring_ahead_of(theirs),
            _ => false,
        }
    }

    /// A peer's keyring came with a push-pull: take it if it wins over ours and carries its
    /// keys; if it wins without them (a request from a peer ahead of us), ask that peer back.
    fn repair_ring_from(
        &mut self,
        sender: NodeId,
        theirs: &crux_proto::flock::KeyringState,
        reply: bool,
    ) {
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if !sec.ring_behind(theirs) {
            return;
        }
        if !theirs.keys.is_empty() {
            if sec.adopt_ring(theirs) {
                debug!(version = theirs.version, "keyring repaired from a peer");
                self.out.events.push_back(Event::KeyringChanged);
            }
        } else if !reply && !self.leaving {
            if let Some(addr) = self.member(sender).map(|m| m.info.addr) {
                self.start_push_pull(addr, false);
            }
        }
    }

    /// Member side: push-pull with the leader when its claim names another keyring version.
    fn repair_ring_with_leader(&mut self, now: Duration) {
        let Some(claim) = self.lead.claim.filter(|c| c.leader != self.me.id) else {
            return;
        };
        let Some(addr) = self.member(claim.leader).map(|m| m.info.addr) else {
            return;
        };
        let grace = self.config.timing.probe_interval * 4;
        let push_odds = 3.0 / self.live_count() as f64;
        let Some(sec) = self.keys.sec.as_mut() else {
            return;
        };
        if sec.ring_repair_due(now, claim.ring, grace, push_odds, &mut self.rng) && !self.leaving {
            self.start_push_pull(addr, false);
        }
    }

    // ----- messages ------------------------------------------------------------------------

    fn on_message(&mut self, now: Duration, from: SocketAddr, header: Header, msg: Message) {
        if self.revoked.contains(&header.sender) {
            self.stats.drop(DropReason::Revoked);
            return;
        }
        self.detect.refute_pending = false;
        self.dispatch(now, from, header, msg);
        self.answer_refutation(from);
    }

    /// What a ping or an ack tells about its sender and the flock: the sender's own entry, the
    /// piggybacked updates, and its membership digest. Returns whether the sender was unknown.
    fn take_peer_news(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        me: MemberInfo,
        digest: u64,
        updates: &[Update],
    ) -> bool {
        let unknown = !self.members.contains(me.id);
        self.apply_sender(now, from, header, me);
        self.apply_updates(now, updates);
        if !unknown && me.id == header.sender {
            self.compare_digest(now, from, digest);
        }
        unknown
    }

    fn dispatch(&mut self, now: Duration, from: SocketAddr, header: Header, msg: Message) {
        let sender = header.sender;
        // A member we hold dead or left is talking to us: push-pull so both sides learn
        // (partition heal, false death).
        self.heal_if_dead(now, from, sender, header.boot);
        match msg {
            Message::Ping {
                seq,
                target: _,
                me,
                digest,
                updates,
            } => {
                let unknown = self.take_peer_news(now, from, header, me, digest, &updates);
                if self.leaving {
                    return;
                }
                let ack = Message::Ack {
                    seq,
                    me: self.my_info(),
                    digest: self.digest(),
                    updates: Vec::new(),
                };
                self.send_with_updates(from, ack);
                if unknown && self.members.contains(me.id) {
                    trace!(peer = %me.id, "discovered by a ping");
                }
            }
            Message::Ack {
                seq,
                me,
                digest,
                updates,
            } => {
                let unknown = self.take_peer_news(now, from, header, me, digest, &updates);
                if let Some(relay) = self.detect.relays.remove(&seq) {
                    let fwd = Message::Ack {
                        seq: relay.seq,
                        me,
                        digest,
                        updates: Vec::new(),
                    };
                    self.send_with_updates(relay.requester, fwd);
                } else {
                    self.on_probe_ack(now, seq, me.id);
                }
                if unknown && self.members.contains(me.id) && !self.leaving {
                    // We found a node we did not know: join with it.
                    self.start_push_pull(from, true);
                }
            }
            Message::PingReq {
                seq,
                target,
                target_addr,
                updates,
            } => {
                self.apply_updates(now, &updates);
                if self.leaving || self.detect.relays.len() >= RELAYS_MAX {
                    return;
                }
                let my_seq = self.next_seq();
                self.detect.relays.insert(
                    my_seq,
                    Relay {
                        requester: from,
                        seq,
                    },
                );
                let msg = Message::IndirectPing {
                    seq: my_seq,
                    target,
                    updates: Vec::new(),
                };
                self.send_with_updates(target_addr, msg);
                let timeout = self.config.timing.probe_timeout;
                self.schedule(now + timeout, Timer::RelayTimeout { seq: my_seq });
            }
            Message::IndirectPing {
                seq,
                target,
                updates,
            } => {
                self.apply_updates(now, &updates);
                if target == self.me.id && !self.leaving {
                    let ack = Message::Ack {
                        seq,
                        me: self.my_info(),
                        digest: self.digest(),
                        updates: Vec::new(),
                    };
                    self.send_with_updates(from, ack);
                }
            }
            Message::Nack { seq } => {
                if let Some(p) = self.detect.probes.get_mut(&seq) {
                    p.nacks += 1;
                }
            }
            Message::Gossip { updates } => self.apply_updates(now, &updates),
            Message::PushPull(pp) => {
                let answer = !pp.reply;
                let ring_keys = self.ring_keys_for(pp.ring.as_ref());
                self.on_push_pull(now, sender, pp);
                if answer && !self.leaving {
                    let reply = self.build_push_pull(true, false, ring_keys);
                    self.send_push_pull(from, reply);
                }
            }
        }
    }

    /// The sender's own entry, carried in pings and acks.
    fn apply_sender(&mut self, now: Duration, from: SocketAddr, header: Header, me: MemberInfo) {
        if me.id != header.sender || me.boot != header.boot || me.state != MemberState::Alive {
            return; // only a node's own claim about itself counts here
        }
        // Trust the address we actually heard from for a node's first appearance.
        let info = if self.members.contains(me.id) {
            me
        } else {
            MemberInfo { addr: from, ..me }
        };
        self.apply_alive(now, info);
    }

    /// Digest anti-entropy: when the live-membership digests of the peers we hear from keep
    /// differing from ours for longer than gossip needs to spread news, push-pull with one of them.
    /// This repairs what gossip missed without waiting for the (N-scaled) periodic push-pull.
    fn compare_digest(&mut self, now: Duration, from: SocketAddr, theirs: u64) {
        if theirs == self.digest() {
            self.spread.digest_mismatch_since = None;
            return;
        }
        let t = &self.config.timing;
        let grace = t.push_pull_fast_interval * FAST_PUSH_PULL_ROUNDS;
        let since = *self.spread.digest_mismatch_since.get_or_insert(now);
        let rested = self
            .spread
            .last_digest_push_pull
            .is_none_or(|last| now >= last + grace);
        if now >= since + grace && rested && !self.leaving {
            self.spread.digest_mismatch_since = None;
            self.spread.last_digest_push_pull = Some(now);
            self.start_push_pull(from, false);
        }
    }

    fn heal_if_dead(&mut self, now: Duration, from: SocketAddr, sender: NodeId, boot: BootId) {
        let Some(info) = self.members.info(sender) else {
            return;
        };
        if info.boot != boot || is_live(info.state) {
            return;
        }
        let period = self.config.timing.dead_probe_interval;
        if self
            .spread
            .last_heal
            .get(&sender)
            .is_some_and(|t| now < *t + period)
        {
            return;
        }
        self.spread.last_heal.insert(sender, now);
        if !self.leaving {
            self.start_push_pull(from, false);
        }
    }

    fn apply_updates(&mut self, now: Duration, updates: &[Update]) {
        for update in updates {
            match *update {
                Update::Alive { member } => self.apply_alive(now, member),
                Update::Suspect {
                    id,
                    boot,
                    incarnation,
                    from,
                } => self.apply_suspect(now, id, boot, incarnation, from),
                Update::Dead {
                    id,
                    boot,
                    incarnation,
                    from,
                } => self.apply_dead(now, id, boot, incarnation, from),
                Update::Left {
                    id,
                    boot,
                    incarnation,
                } => self.apply_left(now, id, boot, incarnation),
                Update::Leader(claim) => self.apply_claim(now, claim),
                Update::Revoke { id } => self.apply_revoke(now, id),
                Update::Key { leader, epoch, key } => self.apply_key(now, leader, epoch, key),
                Update::Keyring { op, key, version } => {
                    let key = SecretKey::from_bytes(key);
                    let op = match op {
                        0 => KeyringOp::Install(key),
                        1 => KeyringOp::Use(key),
                        2 => KeyringOp::Remove(key),
                        _ => continue,
                    };
                    self.keyring_op(op, false, version);
                }
            }
        }
    }

    // ----- membership rules ----------------------------------------------------------------

    fn membership_changed(&mut self, now: Duration) {
        self.lead.last_change = now;
        self.lead.rank_cache = None;
    }

    fn apply_alive(&mut self, now: Duration, info: MemberInfo) {
        self.apply_alive_from(now, info, true);
    }

    /// `gossip`: whether to spread the news (not when it came by push-pull: anti-entropy already
    /// carries it, and re-gossiping a whole member table costs N × retransmits per node).
    fn apply_alive_from(&mut self, now: Duration, info: MemberInfo, gossip: bool) {
        if info.id == self.me.id {
            return; // only we speak for ourselves
        }
        if self.revoked.contains(&info.id) {
            return; // kept out
        }
        let info = MemberInfo {
            state: MemberState::Alive,
            ..info
        };
        let Some(old) = self.members.info(info.id) else {
            if self.members.len() + 1 >= self.config.members_max {
                self.stats.drop(DropReason::TableFull);
                return;
            }
            self.members.set(info, now);
            self.insert_probe_order(info.id);
            self.membership_changed(now);
            if gossip {
                self.spread.broadcasts.push(Update::Alive { member: info });
            }
            self.out.events.push_back(Event::MemberJoined(info));
            return;
        };
        let newer =
            info.boot > old.boot || (info.boot == old.boot && info.incarnation > old.incarnation);
        if !newer {
            return;
        }
        let restarted = info.boot > old.boot;
        let was_live = is_live(old.state);
        self.members.set(info, now);
        self.detect.suspicions.remove(&info.id);
        if gossip {
            self.spread.broadcasts.push(Update::Alive { member: info });
        }
        if restarted || !was_live {
            self.membership_changed(now);
            self.out.events.push_back(Event::MemberJoined(info));
            if restarted
                && self
                    .lead
                    .claim
                    .is_some_and(|c| c.leader == info.id && c.boot != info.boot)
            {
                // The leader restarted: its old claim died with its old boot.
                self.lose_leader(now);
            }
        } else {
            self.out.events.push_back(Event::MemberUpdated(info));
        }
    }

    fn refute(&mut self, incarnation: u64) {
        if self.leaving {
            return;
        }
        if incarnation >= self.self_member.info.incarnation {
            self.self_member.info.incarnation = incarnation + 1;
            self.stats.refutations += 1;
            self.detect.awareness =
                (self.detect.awareness + 1).min(self.config.timing.awareness_max);
            self.spread.broadcasts.push(Update::Alive {
                member: self.self_member.info,
            });
        }
        // Whoever told us also hears the refutation directly (see `answer_refutation`).
        self.detect.refute_pending = true;
    }

    /// Sends our current entry straight back to a peer that holds a stale suspicion of us, so
    /// that it does not depend on gossip (which may have died out) to learn the refutation.
    fn answer_refutation(&mut self, to: SocketAddr) {
        if std::mem::take(&mut self.detect.refute_pending) && !self.leaving {
            let me = self.self_member.info;
            self.send(
                to,
                &Message::Gossip {
                    updates: vec![Update::Alive { member: me }],
                },
            );
        }
    }

    fn apply_suspect(&mut self, now: Duration, id: NodeId, boot: BootId, inc: u64, from: NodeId) {
        if id == self.me.id {
            if boot == self.me.boot {
                self.refute(inc);
            }
            return;
        }
        let live_n = self.live_count();
        let is_leader = self.lead.claim.is_some_and(|c| c.leader == id);
        let Some(info) = self.members.info(id) else {
            return;
        };
        if boot != info.boot || inc < info.incarnation {
            return;
        }
        match info.state {
            MemberState::Alive => {
                self.detect.suspicion_token += 1;
                let token = self.detect.suspicion_token;
                let info = MemberInfo {
                    state: MemberState::Suspect,
                    incarnation: inc,
                    ..info
                };
                self.members.set(info, now);
                self.detect.suspicions.insert(
                    id,
                    Suspicion {
                        started_token: token,
                        started: now,
                        confirmations: vec![from],
                        token,
                    },
                );
                let timeout = suspicion_timeout(&self.config, live_n, is_leader, 0);
                self.schedule(now + timeout, Timer::Suspicion { id, token });
                let update = Update::Suspect {
                    id,
                    boot,
                    incarnation: inc,
                    from,
                };
                self.spread.broadcasts.push(update);
                if from == self.me.id {
                    // Buddy system: our own suspicion goes to the suspect at once, and with every
                    // probe of it while the suspicion runs.
                    self.send(
                        info.addr,
                        &Message::Gossip {
                            updates: vec![update],
                        },
                    );
                    let next = now + self.scaled(self.config.timing.probe_interval);
                    self.schedule(next, Timer::SuspectProbe { id, token });
                }
                self.out.events.push_back(Event::MemberSuspect(info));
            }
            MemberState::Suspect => {
                let Some(s) = self.detect.suspicions.get_mut(&id) else {
                    return;
                };
                if s.confirmations.contains(&from) || s.confirmations.len() >= CONFIRMATIONS_MAX {
                    return;
                }
                s.confirmations.push(from);
                self.detect.suspicion_token += 1;
                s.token = self.detect.suspicion_token;
                let (token, started, c) = (s.token, s.started, s.confirmations.len() - 1);
                let timeout = suspicion_timeout(&self.config, live_n, is_leader, c);
                self.schedule((started + timeout).max(now), Timer::Suspicion { id, token });
                // Re-gossip so that others count this independent confirmation too.
                self.spread.broadcasts.push(Update::Suspect {
                    id,
                    boot,
                    incarnation: inc,
                    from,
                });
            }
            MemberState::Dead | MemberState::Left => {}
        }
    }

    fn on_suspicion_timeout(&mut self, now: Duration, id: NodeId, token: u64) {
        if self
            .detect
            .suspicions
            .get(&id)
            .is_none_or(|s| s.token != token)
        {
            return;
        }
        let Some(info) = self.members.info(id) else {
            return;
        };
        debug!(member = %id, "suspicion timed out: dead");
        self.apply_dead(now, id, info.boot, info.incarnation, self.me.id);
    }

    fn apply_dead(&mut self, now: Duration, id: NodeId, boot: BootId, inc: u64, from: NodeId) {
        if id == self.me.id {
            if boot == self.me.boot {
                self.refute(inc);
            }
            return;
        }
        let update = Update::Dead {
            id,
            boot,
            incarnation: inc,
            from,
        };
        self.retire(
            now,
            id,
            boot,
            inc,
            MemberState::Dead,
            update,
            Event::MemberDead,
        );
    }

    fn apply_left(&mut self, now: Duration, id: NodeId, boot: BootId, inc: u64) {
        if id == self.me.id {
            if boot == self.me.boot && !self.leaving {
                self.refute(inc);
            }
            return;
        }
        let update = Update::Left {
            id,
            boot,
            incarnation: inc,
        };
        self.retire(
            now,
            id,
            boot,
            inc,
            MemberState::Left,
            update,
            Event::MemberLeft,
        );
    }

    /// A member stops being live: declared dead (only from alive or suspect) or gone (left, from
    /// any other state), at incarnation `inc` or later of the same boot. Spreads `update` and
    /// reports the event; a leader that goes loses its leadership.
    #[allow(clippy::too_many_arguments)]
    fn retire(
        &mut self,
        now: Duration,
        id: NodeId,
        boot: BootId,
        inc: u64,
        state: MemberState,
        update: Update,
        event: fn(MemberInfo) -> Event,
    ) {
        let Some(info) = self.members.info(id) else {
            return;
        };
        let from_ok = match state {
            MemberState::Dead => is_live(info.state),
            _ => info.state != state,
        };
        if boot != info.boot || inc < info.incarnation || !from_ok {
            return;
        }
        let info = MemberInfo {
            state,
            incarnation: inc,
            ..info
        };
        self.members.set(info, now);
        self.detect.suspicions.remove(&id);
        self.membership_changed(now);
        self.spread.broadcasts.push(update);
        self.out.events.push_back(event(info));
        if self.lead.claim.is_some_and(|c| c.leader == id) {
            self.lose_leader(now);
        }
    }

    fn insert_probe_order(&mut self, id: NodeId) {
        // As memberlist: new members go to a random place in the rest of this round (swapped
        // there, so that a cold boot's N joins cost O(N), not O(N²)).
        let lo = self.detect.probe_next.min(self.detect.probe_order.len());
        let at = self.rng.gen_range(lo..=self.detect.probe_order.len());
        self.detect.probe_order.push(id);
        let last = self.detect.probe_order.len() - 1;
        self.detect.probe_order.swap(at, last);
    }

    /// Revokes `id` (from a command, an update or a push-pull): forgets it, keeps it out, and
    /// spreads the news once. This node being the one revoked leaves the flock.
    fn apply_revoke(&mut self, now: Duration, id: NodeId) {
        if id == self.me.id {
            if !self.leaving {
                self.out.events.push_back(Event::Revoked);
                self.start_leave(now);
            }
            return;
        }
        if self.revoked.contains(&id) || self.revoked.len() >= REVOKED_MAX {
            return;
        }
        self.revoked.insert(id);
        self.spread.broadcasts.push(Update::Revoke { id });
        if self.members.remove(id).is_some() {
            self.detect.suspicions.remove(&id);
            self.spread.last_heal.remove(&id);
            self.membership_changed(now);
        }
        self.out.events.push_back(Event::MemberRevoked(id));
        if self.lead.claim.is_some_and(|c| c.leader == id) {
            self.lose_leader(now);
        }
    }

    /// The nodes revoked, as this node holds them.
    pub fn revoked(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.revoked.iter().copied()
    }

    fn reap(&mut self, now: Duration) {
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.forget_expired(now);
        }
        let after = self.config.timing.reap_after;
        let expired: Vec<NodeId> = self
            .members
            .iter()
            .filter(|m| !is_live(m.info.state) && now >= m.since + after)
            .map(|m| m.info.id)
            .collect();
        for id in expired {
            self.members.remove(id);
            self.detect.suspicions.remove(&id);
            self.spread.last_heal.remove(&id);
            self.out.events.push_back(Event::MemberReaped(id));
        }
    }

    // ----- leave ---------------------------------------------------------------------------

    fn start_leave(&mut self, now: Duration) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.self_member.info.incarnation += 1;
        self.self_member.info.state = MemberState::Left;
        self.self_member.since = now;
        let me = self.self_member.info;
        self.spread.broadcasts.clear();
        self.spread.broadcasts.push(Update::Left {
            id: me.id,
            boot: me.boot,
            incarnation: me.incarnation,
        });
        if self.lead.claim.is_some_and(|c| c.leader == self.me.id) {
            self.lead.claim = None;
        }
        // Tell a few members at once, then keep gossiping until the leave had time to spread.
        let fanout = self.config.timing.gossip_fanout * 2;
        let targets = self.members.sample_live(fanout, &[], &mut self.rng);
        for id in targets {
            let addr = self.addr(id);
            let msg = Message::Gossip {
                updates: vec![Update::Left {
                    id: me.id,
                    boot: me.boot,
                    incarnation: me.incarnation,
                }],
            };
            self.send(addr, &msg);
        }
        let done = if self.members.live_len() == 0 {
            now
        } else {
            now + self.config.timing.leave_propagation
        };
        self.schedule(done, Timer::LeaveDone);
    }

    // ----- leader election -----------------------------------------------------------------

    fn leader_view_of(&self, claim: &LeaderClaim) -> Option<LeaderView> {
        let addr = self.member(claim.leader)?.info.addr;
        Some(LeaderView {
            id: claim.leader,
            addr,
            term: claim.term,
        })
    }

    fn lose_leader(&mut self, now: Duration) {
        if self.lead.claim.take().is_some() {
            debug!("leader lost");
            self.membership_changed(now);
            self.out.events.push_back(Event::LeaderChanged(None));
        }
    }

    /// Whether a claim names a leader we hold live at the claim's boot.
    fn claim_is_live(&self, claim: &LeaderClaim) -> bool {
        if claim.leader == self.me.id {
            return claim.boot == self.me.boot && !self.leaving;
        }
        self.members
            .info(claim.leader)
            .is_some_and(|m| m.boot == claim.boot && is_live(m.state))
    }

    fn apply_claim(&mut self, now: Duration, claim: LeaderClaim) {
        self.lead.max_term = self.lead.max_term.max(claim.term);
        if claim.leader == self.me.id {
            return; // our own claim coming back, or a claim from a previous boot of ours
        }
        if self.revoked.contains(&claim.leader) {
            return;
        }
        if !self.claim_is_live(&claim) {
            return;
        }
        match self.lead.claim {
            Some(cur) if cur.leader == claim.leader && cur.term == claim.term => {
                if claim.beat > cur.beat {
                    self.lead.claim = Some(claim);
                    self.lead.last_beat = now;
                    self.spread.broadcasts.push(Update::Leader(claim));
                }
            }
            Some(cur) if claim.precedence() <= cur.precedence() => {
                if cur.leader == self.me.id {
                    // Let the other side hear about the better claim soon.
                    self.spread.broadcasts.push(Update::Leader(cur));
                }
            }
            _ => {
                let was_me = self.lead.claim.is_some_and(|c| c.leader == self.me.id);
                self.lead.claim = Some(claim);
                self.sync_key_to_leader(now);
                self.lead.last_beat = now;
                self.spread.broadcasts.push(Update::Leader(claim));
                debug!(leader = %claim.leader, term = claim.term, stepped_down = was_me, "new leader");
                let view = self.leader_view_of(&claim);
                self.out.events.push_back(Event::LeaderChanged(view));
            }
        }
    }

    fn my_rank(&mut self) -> usize {
        if let Some((at, rank)) = self.lead.rank_cache {
            if at == self.lead.last_change {
                return rank;
            }
        }
        let me = self.me.id;
        let rank = self.members.live_ids().filter(|id| *id < me).count();
        self.lead.rank_cache = Some((self.lead.last_change, rank));
        rank
    }

    fn check_leader(&mut self, now: Duration) {
        self.sync_key_to_leader(now);
        self.request_key_if_needed(now);
        self.rotate_if_leader(now);
        self.repair_ring_with_leader(now);
        let t = self.config.timing.clone();
        // Leader liveness: no fresh beat for a while → probe the leader ourselves.
        if let Some(claim) = self.lead.claim {
            if claim.leader != self.me.id
                && now >= self.lead.last_beat + t.leader_timeout
                && !self.detect.probes.values().any(|p| p.leader_check)
            {
                self.lead.last_beat = now; // next check after another leader_timeout
                self.start_probe(now, claim.leader, true);
            }
        }
        let live_n = self.live_count();
        let need = match self.lead.claim {
            None => true,
            Some(c) => c.solo && live_n >= 2,
        };
        if !need {
            return;
        }
        if now < self.lead.last_change + t.settle {
            return;
        }
        let rank = self.my_rank();
        let wait = t.settle + t.election_rank_step * rank.min(1000) as u32;
        if now < self.lead.last_change + wait {
            return;
        }
        let solo = live_n == 1;
        if self
            .lead
            .claim
            .is_some_and(|c| c.solo && c.leader == self.me.id)
            && solo
        {
            return; // already our solo claim
        }
        self.claim(now, solo, rank);
    }

    /// After adopting a leader: seal with its newest key if we hold one, and spread that key
    /// with the claim (a merge: the losing side learns the winner's key this way).
    /// Claims leadership. The term is the highest seen plus one plus our rank among the
    /// candidates: a lower-ranked candidate that claims before the better one's claim reached it
    /// (the news of the old leader's death reaches members at different times) claims another
    /// term, so two leaders never share a term; the higher term wins and the other steps down.
    fn claim(&mut self, now: Duration, solo: bool, rank: usize) {
        let term = self.lead.max_term + 1 + rank.min(1000) as u64;
        self.lead.max_term = term;
        let claim = LeaderClaim {
            leader: self.me.id,
            boot: self.me.boot,
            term,
            solo,
            beat: 0,
            epoch: self.key_epoch().unwrap_or(0),
            ring: self.keys.sec.as_ref().map_or(0, |s| s.ring_version),
        };
        debug!(term, solo, "claiming leadership");
        self.stats.claims += 1;
        self.lead.claim = Some(claim);
        self.lead.last_beat = now;
        self.spread.broadcasts.push(Update::Leader(claim));
        let view = self.leader_view_of(&claim);
        self.out.events.push_back(Event::LeaderChanged(view));
        // Tell a few members at once instead of waiting for the next gossip round.
        self.gossip_round();
        let beat = self.config.timing.leader_beat_interval;
        self.schedule(now + beat, Timer::Beat { term });
        if let Some(sec) = self.keys.sec.as_mut() {
            sec.next_rotation = None; // the first rotation of this term comes 30-60 s from now
            sec.pending_switch = None;
        }
        self.rotate_if_leader(now);
    }
}

fn reap_period(t: &crate::config::Timing) -> Duration {
    (t.reap_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}
