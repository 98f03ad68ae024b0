//! The core's security state: the secondary keyring, the transient keys it holds, replay windows,
//! the handshake rate limit and the handshake it waits on.
//!
//! Built from the primitives of [`crate::crypto`]. What the core adds is the *key set*: a node
//! holds the transient keys of its own flock (the current one and the previous one, the leader
//! rotating them) and, while two flocks merge, those of the other flock. Every key is tagged with
//! the leader that made it and expires 1.5 × the longest rotation period after this node
//! installed it. One key is this node's own sealing key (the key the claim of the leader it
//! follows names). Opening tries exactly the one key the header's key id names.
//!
//! Rotation is make-before-break: the leader announces a new key a third of the shortest
//! rotation period ([`SecurityTiming::switch_delay`]) before it seals with it and names it in its
//! claim, so that the key has reached (nearly) every member before anyone needs it; members then
//! switch as the claim reaches them, and keep accepting the key they switched from. A node seals
//! to a peer under the peer's own key only when we learnt that key after ours (two flocks
//! merging, or we lag behind); an older key a peer was last heard under, whichever leader made
//! it, says nothing about what the peer holds *now* (probes reach a given peer only every N
//! probe intervals), so those peers get our own key. An *answer* (to the datagram or stream
//! request being handled) goes under the key the request came under while we hold it: the peer
//! holds that key now. A member that missed a rotation and a keyring change at once can then
//! still read the push-pull answer that repairs its keyring, and ask for the new key. Keys once dropped are never taken back
//! (a late or re-gossiped announcement of an old key would otherwise restart its life).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, Header, KeyringState, Kind, NodeId};
use rand::{CryptoRng, Rng, RngCore};
use sha2::{Digest as _, Sha256};
use tracing::trace;

use crate::crypto::{
    check, open_for, open_request, seal_for, Bloc, Cookie, CookieSecrets, HandshakeInitiator,
    HandshakeLoad, Initiation, InitiationStamps, JoinKeys, Joined, KeyAnnouncement, Keyring,
    Origin, PacketKey, Purpose, RateLimiter, ReplayTable, SecretKey, Tai64N, COOKIE_REPLY_BYTES,
    COOKIE_REUSE_MAX, MAX_KEYS, MAX_SEALED_FRAME_BYTES, REPLY_BYTES, REQUEST_BYTES,
};
use crate::DropReason;

/// Most transient keys held at once (own flock: current and previous; a merging flock's two).
pub const TRANSIENT_KEYS_MAX: usize = 4;
/// Replay windows kept.
const REPLAY_SENDERS_MAX: usize = 16_384;
/// Epochs remembered as dropped (never installed again).
const RETIRED_MAX: usize = 64;
/// Handshake sources rate-limited at once.
const HANDSHAKE_SOURCES_MAX: usize = 4096;
/// Initiators whose newest initiation is remembered.
const INITIATORS_MAX: usize = 16_384;
/// Source addresses remembered with the node last heard from there.
const PEERS_MAX: usize = 16_384;
/// Cookies kept (one per responder address).
const COOKIES_HELD_MAX: usize = 1024;
/// How far behind ours another node's clock may be: a join request stamped more than this before
/// this node started is refused ([`DropReason::OldInitiation`]), so that a request recorded before
/// a restart is not answered after it. Nodes are expected to keep their clocks within this of
/// each other (NTP does, by orders of magnitude); a node whose clock lags further is refused by a
/// freshly started node until the lag has passed, and still talks to every other node.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(10);
/// How long a handshake of ours waits for its reply. A reply comes within a round trip; one
/// that comes later (or to a request whose reply was lost) is unexpected, and the request is
/// forgotten: no state waits forever for an answer that an attacker could then supply.
const HANDSHAKE_REPLY_WINDOW: Duration = Duration::from_secs(3);

struct TransientKey {
    epoch: u32,
    key: SecretKey,
    packet: PacketKey,
    since: Duration,
    leader: NodeId,
}

/// Security settings the core needs (from [`crate::Config::security`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityTiming {
    /// Shortest period between two rotations of the transient key.
    pub rotation_min: Duration,
    /// Longest period; keys are accepted for 1.5 × this after they were installed.
    pub rotation_max: Duration,
}

impl SecurityTiming {
    /// How long the leader announces a new key before it seals with it (and names it in its
    /// claim): a third of the shortest rotation period (10 s with the agent's 30–60 s), the time
    /// gossip needs to bring the key to every member.
    pub fn switch_delay(&self) -> Duration {
        self.rotation_min / 3
    }
}

impl Default for SecurityTiming {
    /// 30–60 s, as DESIGN.md.
    fn default() -> Self {
        SecurityTiming {
            rotation_min: crate::crypto::ROTATION_MIN,
            rotation_max: crate::crypto::ROTATION_MAX,
        }
    }
}

/// What [`Sec::rotate_if_due`] did.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rotation {
    /// A new key was made: announce it.
    pub(crate) announced: Option<u32>,
    /// The leader now seals with this key: name it in the claim.
    pub(crate) switched: Option<u32>,
}

pub(crate) struct Pending {
    initiator: HandshakeInitiator,
    pub(crate) started: Duration,
    to: SocketAddr,
    context: Vec<u8>,
    /// Whether this request already carried a fresh cookie (a second cookie reply is not
    /// followed).
    cookied: bool,
}

/// What an incoming datagram turned out to be.
pub(crate) enum Opened {
    /// A flock datagram; the body is in the output buffer.
    Flock(Header),
    /// A handshake request to answer with `reply`.
    Request {
        request: Header,
        context: Vec<u8>,
        reply: Vec<u8>,
    },
    /// The answer to our handshake.
    Joined(Joined),
    /// Under load: send `reply` (a cookie reply, smaller than the request) to the request's
    /// source instead of answering it.
    CookieReply { reply: Vec<u8> },
    /// Our handshake's responder is under load and gave us a cookie: send `request` (the same
    /// handshake, with the cookie) to `to`.
    Retry { to: SocketAddr, request: Vec<u8> },
}

pub(crate) struct Sec {
    pub(crate) bloc: Bloc,
    mtu: usize,
    pub(crate) keyring: Keyring,
    keys: Vec<TransientKey>,
    own: Option<u32>,
    replay: ReplayTable,
    limiter: RateLimiter,
    pub(crate) pending: Option<Pending>,
    max_age: Duration,
    timing: SecurityTiming,
    pub(crate) next_rotation: Option<Duration>,
    /// Leader side: a key announced and not sealed with yet, and when to switch to it.
    pub(crate) pending_switch: Option<(Duration, u32)>,
    /// Epochs dropped lately, newest last: never installed again.
    retired: std::collections::VecDeque<u32>,
    /// Version of the secondary keyring ([`KeyringState::version`]).
    pub(crate) ring_version: u64,
    /// Highest keyring version seen anywhere (a local change goes above it).
    ring_seen: u64,
    /// Since when the leader's claim names another keyring version than ours.
    ring_mismatch_since: Option<Duration>,
    /// When we last push-pulled with the leader over the keyring.
    ring_last_repair: Option<Duration>,
    /// Which keyring key our handshakes use (index into the list, primary first).
    handshake_key: usize,
    /// This node's flock address: join requests addressed elsewhere are refused.
    addr: SocketAddr,
    /// The newest join request taken from each initiator.
    stamps: InitiationStamps,
    /// Responder side: the secrets cookies are made with, and the load that calls for them.
    cookie_secrets: CookieSecrets,
    load: HandshakeLoad,
    /// Initiator side: cookies received, by responder address, and when.
    cookies: HashMap<SocketAddr, (Cookie, Duration)>,
    /// The node whose authenticated datagram came last from each source address: a reply to an
    /// address is sealed for that node.
    peers: HashMap<SocketAddr, NodeId>,
    /// Wall clock: nanoseconds since the Unix epoch at core time `.0`.
    wall: (Duration, u128),
    /// When this node started (wall clock): older join requests are refused.
    started: Tai64N,
    /// The last timestamp this node put on a join request.
    last_stamp: Tai64N,
    id: NodeId,
    boot: BootId,
}

/// The wall-clock start of a boot, from its id ([`crate::boot_id`]: milliseconds in the high 48
/// bits), in nanoseconds since the Unix epoch.
fn boot_wall_nanos(boot: BootId) -> u128 {
    u128::from(boot.0 >> 16) * 1_000_000
}

impl Sec {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        bloc: &str,
        mtu: usize,
        keyring: Keyring,
        timing: SecurityTiming,
        id: NodeId,
        boot: BootId,
        addr: SocketAddr,
        now: Duration,
    ) -> Sec {
        let wall = (now, boot_wall_nanos(boot));
        let started = Tai64N::from_unix_nanos(wall.1);
        Sec {
            bloc: Bloc::new(bloc),
            mtu,
            keyring,
            keys: Vec::new(),
            own: None,
            replay: ReplayTable::new(REPLAY_SENDERS_MAX),
            limiter: RateLimiter::new(HANDSHAKE_SOURCES_MAX),
            pending: None,
            max_age: timing.rotation_max * 3 / 2,
            timing,
            next_rotation: None,
            pending_switch: None,
            retired: std::collections::VecDeque::new(),
            ring_version: 0,
            ring_seen: 0,
            ring_mismatch_since: None,
            ring_last_repair: None,
            handshake_key: 0,
            addr,
            stamps: InitiationStamps::new(INITIATORS_MAX),
            cookie_secrets: CookieSecrets::new(),
            load: HandshakeLoad::default(),
            cookies: HashMap::new(),
            peers: HashMap::new(),
            wall,
            started,
            last_stamp: Tai64N::default(),
            id,
            boot,
        }
    }

    /// Sets the wall clock: `unix_nanos` nanoseconds since the Unix epoch at core time `now`
    /// (the driver reads it once at its start; without it, the boot id's start time is used).
    /// This node's start, as join requests are checked against it, moves with it.
    pub(crate) fn set_wall_clock(&mut self, now: Duration, unix_nanos: u128) {
        let since_start = now.saturating_sub(self.wall.0).as_nanos();
        self.wall = (now, unix_nanos);
        self.started = Tai64N::from_unix_nanos(unix_nanos.saturating_sub(since_start));
    }

    /// The wall-clock time at core time `now`, on the monotonic clock.
    pub(crate) fn wall_at(&self, now: Duration) -> Tai64N {
        let (t0, nanos0) = self.wall;
        let since = now.as_nanos() as i128 - t0.as_nanos() as i128;
        Tai64N::from_unix_nanos((nanos0 as i128 + since).max(0) as u128)
    }

    /// The timestamp of a join request made at `now`: the wall clock, strictly increasing.
    fn next_stamp(&mut self, now: Duration) -> Tai64N {
        let t = self.wall_at(now);
        self.last_stamp = if t > self.last_stamp {
            t
        } else {
            self.last_stamp.next()
        };
        self.last_stamp
    }

    /// Remembers that an authenticated datagram of `sender` came from `from`.
    fn heard(&mut self, from: SocketAddr, sender: NodeId) {
        if self.peers.get(&from) == Some(&sender) {
            return;
        }
        if self.peers.len() >= PEERS_MAX {
            self.peers.clear();
        }
        self.peers.insert(from, sender);
    }

    /// The node a datagram to `to` is sealed for: the member the table puts there (`member`:
    /// its id and whether it is live) if live, else the node last heard from that address, else
    /// the table's (dead) member.
    pub(crate) fn recipient(
        &self,
        to: SocketAddr,
        member: Option<(NodeId, bool)>,
    ) -> Option<NodeId> {
        match (member, self.peers.get(&to).copied()) {
            (Some((m, true)), _) => Some(m),
            (_, Some(h)) => Some(h),
            (Some((m, false)), None) => Some(m),
            (None, None) => None,
        }
    }

    fn fresh(&self, k: &TransientKey, now: Duration) -> bool {
        now.saturating_sub(k.since) <= self.max_age
    }

    fn find(&self, epoch: u32) -> Option<&TransientKey> {
        self.keys.iter().find(|k| k.epoch == epoch)
    }

    /// The epoch this node seals with by default, if it holds a fresh one.
    pub(crate) fn own_epoch(&self, now: Duration) -> Option<u32> {
        let e = self.own?;
        self.find(e).filter(|k| self.fresh(k, now)).map(|k| k.epoch)
    }

    /// True when this node holds no fresh key to seal with: it must (re)join by handshake.
    pub(crate) fn needs_key(&self, now: Duration) -> bool {
        self.own_epoch(now).is_none()
    }

    /// Whether this node holds `epoch` with exactly these key bytes.
    pub(crate) fn holds_key(&self, epoch: u32, key: &SecretKey) -> bool {
        self.find(epoch).is_some_and(|k| &k.key == key)
    }

    /// Whether this node holds a fresh key of `epoch`.
    pub(crate) fn holds(&self, epoch: u32, now: Duration) -> bool {
        self.find(epoch).is_some_and(|k| self.fresh(k, now))
    }

    /// Makes `epoch` (held) this node's sealing key. This key, the one it replaces and keys
    /// learnt after it (announced ahead of their use) stay: members accept the current and the
    /// previous epoch (in a merge: the winning flock's key and the former one, for the members
    /// that have not switched yet).
    pub(crate) fn set_own(&mut self, epoch: u32) {
        let Some(since) = self.find(epoch).map(|k| k.since) else {
            return;
        };
        let previous = self.own.replace(epoch);
        if previous != Some(epoch) {
            self.keep(|k| k.epoch == epoch || Some(k.epoch) == previous || k.since >= since);
        }
    }

    /// Keeps the keys `f` accepts; the others are wiped and retired.
    fn keep(&mut self, f: impl Fn(&TransientKey) -> bool) {
        let mut i = 0;
        while i < self.keys.len() {
            if f(&self.keys[i]) {
                i += 1;
            } else {
                let k = self.keys.remove(i);
                self.retire(k.epoch);
            }
        }
    }

    fn retire(&mut self, epoch: u32) {
        if !self.retired.contains(&epoch) {
            if self.retired.len() >= RETIRED_MAX {
                self.retired.pop_front();
            }
            self.retired.push_back(epoch);
        }
    }

    /// Installs a key; returns false if it was already held, or held before and dropped —
    /// unless `wanted`: the key our leader's claim names, or the one a handshake answer brings
    /// us when we need one (a key dropped while we lagged, or evicted by other flocks' keys).
    pub(crate) fn install(
        &mut self,
        epoch: u32,
        key: SecretKey,
        leader: NodeId,
        now: Duration,
        wanted: bool,
    ) -> bool {
        if self.find(epoch).is_some() {
            return false;
        }
        if let Some(i) = self.retired.iter().position(|e| *e == epoch) {
            if !wanted {
                return false;
            }
            self.retired.remove(i);
        }
        let packet = PacketKey::transient(&key, &self.bloc);
        self.keys.push(TransientKey {
            epoch,
            key,
            packet,
            since: now,
            leader,
        });
        // Expired keys go; past the bound, the oldest go (never our own sealing key, never the
        // key just learnt). Dropped keys wipe themselves.
        let max_age = self.max_age;
        let own = self.own;
        self.keep(|k| now.saturating_sub(k.since) <= max_age || Some(k.epoch) == own);
        while self.keys.len() > TRANSIENT_KEYS_MAX {
            let oldest = self
                .keys
                .iter()
                .enumerate()
                .filter(|(_, k)| Some(k.epoch) != own && k.epoch != epoch)
                .min_by_key(|(_, k)| k.since)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    let k = self.keys.remove(i);
                    self.retire(k.epoch);
                }
                None => break,
            }
        }
        true
    }

    /// The keys a handshake responder hands out: our own key and, as the second one, the key
    /// our leader announced next if we hold it (the asker needs it within seconds), else the
    /// one before ours.
    fn join_keys(&self, now: Duration) -> Option<JoinKeys> {
        let own = self.find(self.own?).filter(|k| self.fresh(k, now))?;
        let others = || {
            self.keys
                .iter()
                .filter(|k| k.leader == own.leader && k.epoch != own.epoch && self.fresh(k, now))
        };
        let next = others()
            .filter(|k| k.since >= own.since)
            .max_by_key(|k| k.since);
        let previous = next
            .or_else(|| others().max_by_key(|k| k.since))
            .map(|k| KeyAnnouncement {
                epoch: k.epoch,
                key: k.key.clone(),
            });
        Some(JoinKeys {
            current: KeyAnnouncement {
                epoch: own.epoch,
                key: own.key.clone(),
            },
            previous,
        })
    }

    /// The raw key of a held epoch (to spread it to other members).
    pub(crate) fn key_bytes(&self, epoch: u32) -> Option<[u8; 32]> {
        self.find(epoch).map(|k| *k.key.as_bytes())
    }

    /// Whether a peer last heard under `epoch` should get that key rather than ours: a key learnt
    /// after ours (a flock merging: the other flock's key a handshake just brought; or we lag
    /// behind the peer). Any key older than ours, whichever leader made it, may be gone from the
    /// peer by now (a key of a solo leader of the cold boot, last heard from that peer a minute
    /// ago, is).
    fn peer_key_better(&self, epoch: u32, now: Duration) -> bool {
        let Some(k) = self.find(epoch).filter(|k| self.fresh(k, now)) else {
            return false;
        };
        match self.own.and_then(|e| self.find(e)) {
            Some(own) => k.since > own.since,
            None => true,
        }
    }

    /// A datagram from a member came under `epoch`, a key of `leader` (the leader we follow)
    /// learnt after our own sealing key: the leader switched to it and we missed the claim that
    /// said so. Seal with it too. Returns whether we switched.
    pub(crate) fn follow_newer(&mut self, epoch: u32, leader: NodeId, now: Duration) -> bool {
        let newer = match (self.find(epoch), self.own.and_then(|e| self.find(e))) {
            (Some(k), Some(own)) => {
                k.leader == leader
                    && own.leader == leader
                    && k.since > own.since
                    && self.fresh(k, now)
            }
            _ => false,
        };
        if newer {
            self.set_own(epoch);
        }
        newer
    }

    /// Seals with `epoch` (held), the key the claim of `leader` names, unless we already seal
    /// with a key of that leader learnt after it ([`Sec::follow_newer`] ran ahead of the claim).
    pub(crate) fn follow_claim(&mut self, epoch: u32, leader: NodeId, now: Duration) {
        if self.own_epoch(now) == Some(epoch) {
            return;
        }
        let ahead = match (self.find(epoch), self.own.and_then(|e| self.find(e))) {
            (Some(k), Some(own)) => {
                own.leader == leader && k.leader == leader && own.since > k.since
            }
            _ => false,
        };
        if !ahead || self.needs_key(now) {
            self.set_own(epoch);
        }
    }

    /// Seals a flock body for `recipient`: an answer under `answer_epoch` (the key the datagram
    /// it answers came under) while we hold it; otherwise under our own key, or under
    /// `dest_epoch` (the key the peer was last heard under) when [`Sec::peer_key_better`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn seal<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        counter: u64,
        answer_epoch: Option<u32>,
        dest_epoch: Option<u32>,
        recipient: NodeId,
        body: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> bool {
        let answer = answer_epoch.filter(|e| self.holds(*e, now));
        let epoch = match answer.or(dest_epoch.filter(|e| self.peer_key_better(*e, now))) {
            Some(e) => e,
            None => match self.own_epoch(now) {
                Some(e) => e,
                None => return false,
            },
        };
        let key = &self.find(epoch).expect("held").packet;
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: self.bloc.tag(),
            key_id: epoch,
            sender: self.id,
            boot: self.boot,
            counter,
        };
        seal_for(key, &header, recipient, body, rng, out);
        true
    }

    /// Opens a flock datagram or frame: one key (the header's), one decryption, replay window.
    fn open_flock(
        &mut self,
        now: Duration,
        bytes: &[u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Header, DropReason> {
        let header = check(bytes, max, self.bloc.tag()).map_err(DropReason::from)?;
        if header.sender == self.id {
            return Err(DropReason::FromSelf);
        }
        if header.kind != Kind::Flock {
            return Err(DropReason::Malformed);
        }
        let key = match self.find(header.key_id) {
            Some(k) if self.fresh(k, now) => &k.packet,
            Some(_) => return Err(DropReason::StaleKey),
            None => return Err(DropReason::UnknownKey),
        };
        if !self
            .replay
            .check(header.sender, header.boot, header.counter)
        {
            return Err(DropReason::Replay);
        }
        open_for(key, bytes, self.id, out).map_err(DropReason::from)?;
        if !self
            .replay
            .accept(header.sender, header.boot, header.counter)
        {
            return Err(DropReason::Replay);
        }
        Ok(header)
    }

    /// Opens a stream frame.
    pub(crate) fn open_frame(
        &mut self,
        now: Duration,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Header, DropReason> {
        out.clear();
        self.open_flock(now, bytes, MAX_SEALED_FRAME_BYTES, out)
    }

    /// Opens any datagram. Handshake requests are answered (`context` goes back to the
    /// initiator), or, under load, answered with a cookie; a reply to our pending handshake
    /// completes it, and a cookie reply to it makes us send it again with the cookie.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open_datagram<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
        counter: &mut u64,
        context: &[u8],
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<Opened, DropReason> {
        out.clear();
        let header = check(bytes, self.mtu, self.bloc.tag()).map_err(DropReason::from)?;
        if header.sender == self.id {
            return Err(DropReason::FromSelf);
        }
        if header.kind == Kind::Flock {
            let h = self.open_flock(now, bytes, self.mtu, out)?;
            self.heard(from, h.sender);
            return Ok(Opened::Flock(h));
        }
        match bytes.len() {
            REQUEST_BYTES => self.on_request(now, from, bytes, counter, context, rng),
            REPLY_BYTES => {
                self.expire_pending(now);
                let pending = self.pending.as_ref().ok_or(DropReason::Unexpected)?;
                let joined = pending
                    .initiator
                    .finish(bytes)
                    .map_err(|e| e.drop_reason())?;
                let h = joined.header;
                if !self.replay.accept(h.sender, h.boot, h.counter) {
                    return Err(DropReason::Replay);
                }
                self.pending = None;
                self.heard(from, h.sender);
                Ok(Opened::Joined(joined))
            }
            COOKIE_REPLY_BYTES => self.on_cookie_reply(now, from, bytes, counter, rng),
            _ => Err(DropReason::Malformed),
        }
    }

    /// A join request (or key request), in WireGuard's order: authenticate (one decryption, no
    /// x25519), refuse one addressed to another node or not newer than the last one taken from
    /// its sender (replays, silently), rate-limit its source, ask for a cookie under load, and
    /// only then do the x25519 work of an answer.
    fn on_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
        counter: &mut u64,
        context: &[u8],
        rng: &mut R,
    ) -> Result<Opened, DropReason> {
        let request =
            open_request(&self.keyring, &self.bloc, bytes).map_err(|e| e.drop_reason())?;
        let h = request.header;
        if request.to != self.addr {
            trace!(%from, sender = %h.sender, to = %request.to, "join request for another address");
            return Err(DropReason::Misdirected);
        }
        let floor = Tai64N::from_unix_nanos(
            self.started
                .unix_nanos()
                .saturating_sub(CLOCK_SKEW_MAX.as_nanos()),
        );
        if request.stamp < floor {
            trace!(%from, sender = %h.sender, "join request stamped before this node started");
            return Err(DropReason::OldInitiation);
        }
        // Recorded even if not answered below (no key yet, rate-limited, under load): a replay
        // of this request later gets nothing either.
        if !self.stamps.accept(h.sender, h.boot, request.stamp) {
            return Err(DropReason::OldInitiation);
        }
        if !self.replay.accept(h.sender, h.boot, h.counter) {
            return Err(DropReason::Replay);
        }
        if !self.limiter.allow(from.ip(), now) {
            return Err(DropReason::RateLimited);
        }
        let keys = self.join_keys(now).ok_or(DropReason::Unexpected)?;
        let origin = Origin {
            sender: self.id,
            boot: self.boot,
            counter: *counter + 1,
        };
        let cookie_ok = request
            .cookie
            .is_some_and(|c| self.cookie_secrets.check(now, from, &c));
        if cookie_ok {
            self.load.take(now);
        } else if !self.load.try_take(now) {
            let cookie = self.cookie_secrets.cookie(now, from, rng);
            *counter += 1;
            return Ok(Opened::CookieReply {
                reply: request.cookie_reply(&cookie, origin, rng),
            });
        }
        let reply = request
            .answer(Some(&keys), origin, context, rng)
            .map_err(|e| e.drop_reason())?;
        *counter += 1;
        self.heard(from, h.sender);
        Ok(Opened::Request {
            request: h,
            context: request.context,
            reply,
        })
    }

    /// A cookie reply to our pending handshake: keep the cookie for that address and send the
    /// handshake again with it (once per handshake).
    fn on_cookie_reply<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
        counter: &mut u64,
        rng: &mut R,
    ) -> Result<Opened, DropReason> {
        self.expire_pending(now);
        let pending = self.pending.as_ref().ok_or(DropReason::Unexpected)?;
        let (h, cookie) = pending
            .initiator
            .finish_cookie(bytes)
            .map_err(|e| e.drop_reason())?;
        if !self.replay.accept(h.sender, h.boot, h.counter) {
            return Err(DropReason::Replay);
        }
        let (to, purpose, cookied) = (pending.to, pending.initiator.purpose(), pending.cookied);
        let context = pending.context.clone();
        if cookied || from != to {
            // The request we sent with a cookie was refused again (try later, as planned), or
            // the cookie came from elsewhere than where we sent the request.
            return Err(DropReason::Unexpected);
        }
        if self.cookies.len() >= COOKIES_HELD_MAX {
            self.cookies.clear();
        }
        self.cookies.insert(to, (cookie, now));
        *counter += 1;
        let request = self.initiate(now, *counter, to, purpose, &context, false, rng);
        Ok(Opened::Retry { to, request })
    }

    /// Starts a handshake with `to` under the keyring's primary key; returns the request
    /// datagram (stamped with the wall clock, carrying a cookie `to` gave us lately).
    pub(crate) fn start_handshake<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        counter: u64,
        to: SocketAddr,
        purpose: Purpose,
        context: &[u8],
        rng: &mut R,
    ) -> Vec<u8> {
        let next_key = self.pending.is_some();
        self.initiate(now, counter, to, purpose, context, next_key, rng)
    }

    #[allow(clippy::too_many_arguments)]
    fn initiate<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        counter: u64,
        to: SocketAddr,
        purpose: Purpose,
        context: &[u8],
        next_key: bool,
        rng: &mut R,
    ) -> Vec<u8> {
        let origin = Origin {
            sender: self.id,
            boot: self.boot,
            counter,
        };
        let cookie = self
            .cookies
            .get(&to)
            .filter(|(_, at)| now.saturating_sub(*at) < COOKIE_REUSE_MAX)
            .map(|(c, _)| *c);
        // The primary key first; while handshakes go unanswered, the other installed keys in
        // turn (a node whose primary was removed from the flock's ring while it was away still
        // gets in with another key the flock holds). A retry with a cookie keeps the key.
        if next_key {
            self.handshake_key = self.handshake_key.wrapping_add(1);
        }
        let stamp = self.next_stamp(now);
        let keys = self.keyring.list();
        let secondary = keys[self.handshake_key % keys.len()];
        let initiation = Initiation {
            purpose,
            origin,
            to,
            stamp,
            cookie,
            context,
        };
        let (initiator, request) = HandshakeInitiator::new(rng, secondary, &self.bloc, &initiation);
        self.pending = Some(Pending {
            initiator,
            started: now,
            to,
            context: context.to_vec(),
            cookied: cookie.is_some(),
        });
        request
    }

    /// Forgets our handshake once [`HANDSHAKE_REPLY_WINDOW`] has passed: a reply arriving
    /// later is unexpected.
    fn expire_pending(&mut self, now: Duration) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| now >= p.started + HANDSHAKE_REPLY_WINDOW)
        {
            self.pending = None;
        }
    }

    /// Leader side: announces a new key when the rotation is due (the next rotation is 30–60 s
    /// later, jittered), and switches to it [`SecurityTiming::switch_delay`] later. A leader
    /// without a fresh key of its own makes one and switches at once.
    pub(crate) fn rotate_if_due<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        me: NodeId,
        rng: &mut R,
    ) -> Rotation {
        let mut r = Rotation::default();
        if self.needs_key(now) {
            self.pending_switch = None;
            if let Some(epoch) = self.make_key(now, me, rng) {
                self.set_own(epoch);
                self.next_rotation = Some(self.jittered(now, rng));
                r.announced = Some(epoch);
                r.switched = Some(epoch);
            }
            return r;
        }
        if let Some((at, epoch)) = self.pending_switch {
            if now >= at {
                self.pending_switch = None;
                if self.holds(epoch, now) {
                    self.set_own(epoch);
                    r.switched = Some(epoch);
                }
            }
            return r;
        }
        // A new leader keeps the key it inherited (every member holds it) until its first
        // rotation is due.
        match self.next_rotation {
            Some(at) if now >= at => {}
            Some(_) => return r,
            None => {
                self.next_rotation = Some(self.jittered(now, rng));
                return r;
            }
        }
        if let Some(epoch) = self.make_key(now, me, rng) {
            self.pending_switch = Some((now + self.timing.switch_delay(), epoch));
            self.next_rotation = Some(self.jittered(now, rng));
            r.announced = Some(epoch);
        }
        r
    }

    /// Makes and installs a fresh key under a random epoch: two leaders that rotate apart (a
    /// partition) never make two different keys under one epoch, which members could not tell
    /// apart.
    fn make_key<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        me: NodeId,
        rng: &mut R,
    ) -> Option<u32> {
        let mut epoch = rng.next_u32();
        while epoch == 0 || self.find(epoch).is_some() || self.retired.contains(&epoch) {
            epoch = rng.next_u32();
        }
        let key = SecretKey::generate(rng);
        self.install(epoch, key, me, now, false).then_some(epoch)
    }

    fn jittered<R: RngCore + CryptoRng>(&self, now: Duration, rng: &mut R) -> Duration {
        let (lo, hi) = (
            self.timing.rotation_min,
            self.timing.rotation_max.max(self.timing.rotation_min),
        );
        let span = (hi - lo).as_millis() as u64;
        now + lo
            + Duration::from_millis(if span == 0 {
                0
            } else {
                rng.gen_range(0..=span)
            })
    }

    // ----- keyring repair ---------------------------------------------------------------
    //
    // Keyring changes spread as gossip (and straight to every member from the node where the
    // operator made them); a member that missed one learns the whole ring. Every change raises
    // the ring's version; the leader's claim names its version, and push-pull carries the
    // sender's version and digest (and the keys, to a peer that is behind). Of two rings the
    // higher version wins, at equal versions the higher digest.

    /// A digest of the ring: the primary key, then the others in byte order.
    pub(crate) fn ring_digest(&self) -> u64 {
        let list = self.keyring.list();
        let mut others: Vec<&[u8; 32]> = list[1..].iter().map(|k| k.as_bytes()).collect();
        others.sort();
        let mut h = Sha256::new();
        h.update(b"crux flock keyring digest v1");
        h.update(list[0].as_bytes());
        for k in others {
            h.update(k);
        }
        let d = h.finalize();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// Our ring for push-pull, with its keys if `with_keys`.
    pub(crate) fn ring_state(&self, with_keys: bool) -> KeyringState {
        KeyringState {
            version: self.ring_version,
            digest: self.ring_digest(),
            keys: if with_keys {
                self.keyring.list().iter().map(|k| *k.as_bytes()).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn ring_order(&self, theirs: &KeyringState) -> std::cmp::Ordering {
        (theirs.version, theirs.digest).cmp(&(self.ring_version, self.ring_digest()))
    }

    /// Whether a peer's ring wins over ours (we are behind).
    pub(crate) fn ring_behind(&mut self, theirs: &KeyringState) -> bool {
        self.ring_seen = self.ring_seen.max(theirs.version);
        self.ring_order(theirs).is_gt()
    }

    /// Whether our ring wins over a peer's (it is behind: answer with our keys).
    pub(crate) fn ring_ahead_of(&self, theirs: &KeyringState) -> bool {
        self.ring_order(theirs).is_lt()
    }

    /// Takes a peer's ring that wins over ours (keys included, at most [`MAX_KEYS`], matching
    /// its digest). Returns whether our ring changed.
    pub(crate) fn adopt_ring(&mut self, theirs: &KeyringState) -> bool {
        if !self.ring_behind(theirs) || theirs.keys.is_empty() || theirs.keys.len() > MAX_KEYS {
            return false;
        }
        let mut ring = Keyring::new(SecretKey::from_bytes(theirs.keys[0]));
        for k in &theirs.keys[1..] {
            if !matches!(ring.install(SecretKey::from_bytes(*k)), Ok(true)) {
                return false; // a repeated key: not a ring any node keeps
            }
        }
        let before = self.ring_digest();
        let previous = std::mem::replace(&mut self.keyring, ring);
        if self.ring_digest() != theirs.digest {
            self.keyring = previous;
            return false;
        }
        self.ring_version = theirs.version;
        self.handshake_key = 0;
        before != theirs.digest
    }

    /// The version a change made here gets: above every version seen.
    pub(crate) fn next_ring_version(&mut self) -> u64 {
        self.ring_version = self.ring_version.max(self.ring_seen) + 1;
        self.ring_seen = self.ring_version;
        self.ring_version
    }

    /// Whether a change spread at `version` is news to us (older changes are already in our
    /// ring, or were undone by later ones: a late gossip must not bring back a removed key).
    pub(crate) fn ring_change_is_news(&self, version: u64) -> bool {
        version > self.ring_version
    }

    /// A change spread at `version` was applied.
    pub(crate) fn ring_changed_to(&mut self, version: u64) {
        self.ring_version = self.ring_version.max(version);
        self.ring_seen = self.ring_seen.max(version);
    }

    /// Member side, at each election tick: whether to push-pull with the leader over the
    /// keyring, its claim naming version `leader_ring`. When the versions have differed for
    /// `grace` (the time gossip needs to bring a change everywhere): pull if we are behind;
    /// if we are ahead (the leader missed a change) push, with probability `push_odds` so that
    /// not every member does. At most once per `grace`.
    pub(crate) fn ring_repair_due<R: Rng>(
        &mut self,
        now: Duration,
        leader_ring: u64,
        grace: Duration,
        push_odds: f64,
        rng: &mut R,
    ) -> bool {
        self.ring_seen = self.ring_seen.max(leader_ring);
        if leader_ring == self.ring_version {
            self.ring_mismatch_since = None;
            return false;
        }
        let since = *self.ring_mismatch_since.get_or_insert(now);
        let rested = self.ring_last_repair.is_none_or(|t| now >= t + grace);
        if now < since + grace || !rested {
            return false;
        }
        if leader_ring < self.ring_version && !rng.gen_bool(push_odds.clamp(0.0, 1.0)) {
            self.ring_last_repair = Some(now);
            return false;
        }
        self.ring_last_repair = Some(now);
        true
    }

    /// Epochs held (oldest first), for metrics and tests.
    pub(crate) fn epochs(&self) -> Vec<u32> {
        let mut v: Vec<_> = self.keys.iter().map(|k| (k.since, k.epoch)).collect();
        v.sort();
        v.into_iter().map(|x| x.1).collect()
    }

    pub(crate) fn forget_expired(&mut self, now: Duration) {
        let max_age = self.max_age;
        self.keep(|k| now.saturating_sub(k.since) <= max_age);
        if self.own.is_some_and(|e| self.find(e).is_none()) {
            self.own = None;
        }
        self.limiter.prune(now);
        self.cookies
            .retain(|_, (_, at)| now.saturating_sub(*at) < COOKIE_REUSE_MAX);
    }
}

/// Decodes the context a handshake carries: a leader claim (or nothing).
pub(crate) fn decode_claim(context: &[u8]) -> Option<crux_proto::flock::LeaderClaim> {
    if context.len() != 37 {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(context[i..i + 8].try_into().expect("8 bytes"));
    Some(crux_proto::flock::LeaderClaim {
        leader: NodeId(u64_at(0)),
        boot: BootId(u64_at(8)),
        term: u64_at(16),
        solo: context[24] != 0,
        beat: u64_at(25),
        epoch: u32::from_le_bytes(context[33..37].try_into().expect("4 bytes")),
        ring: 0, // not carried: the handshake's size is fixed
    })
}

/// Encodes a leader claim as handshake context (37 bytes).
pub(crate) fn encode_claim(claim: Option<&crux_proto::flock::LeaderClaim>) -> Vec<u8> {
    let Some(c) = claim else {
        return Vec::new();
    };
    let mut v = Vec::with_capacity(37);
    v.extend_from_slice(&c.leader.0.to_le_bytes());
    v.extend_from_slice(&c.boot.0.to_le_bytes());
    v.extend_from_slice(&c.term.to_le_bytes());
    v.push(c.solo as u8);
    v.extend_from_slice(&c.beat.to_le_bytes());
    v.extend_from_slice(&c.epoch.to_le_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(ring: &[u8]) -> Sec {
        let mut keyring = Keyring::new(SecretKey::from_bytes([ring[0]; 32]));
        for b in &ring[1..] {
            keyring.install(SecretKey::from_bytes([*b; 32])).unwrap();
        }
        Sec::new(
            "bloc",
            1400,
            keyring,
            SecurityTiming::default(),
            NodeId(1),
            BootId(1),
            "127.0.0.2:7700".parse().unwrap(),
            Duration::ZERO,
        )
    }

    #[test]
    fn a_ring_is_taken_only_when_it_wins_and_is_whole() {
        let mut behind = sec(&[1, 2]);
        let mut ahead = sec(&[2]);
        ahead.ring_version = 3;
        let state = ahead.ring_state(true);
        assert!(behind.ring_behind(&state));
        assert!(ahead.ring_ahead_of(&behind.ring_state(false)));
        // Without keys, a repeated key, too many keys, or keys that do not match the digest:
        // nothing changes.
        let mut junk = state.clone();
        junk.keys.clear();
        assert!(!behind.adopt_ring(&junk));
        junk.keys = vec![[2; 32], [2; 32]];
        assert!(!behind.adopt_ring(&junk));
        junk.keys = (0..=MAX_KEYS as u8).map(|b| [b; 32]).collect();
        assert!(!behind.adopt_ring(&junk));
        junk.keys = vec![[5; 32]];
        assert!(!behind.adopt_ring(&junk));
        assert_eq!(behind.keyring.len(), 2);
        assert_eq!(behind.ring_version, 0);
        // The whole ring of a higher version is taken, and then nothing older is.
        assert!(behind.adopt_ring(&state));
        assert_eq!(behind.keyring.list(), [&SecretKey::from_bytes([2; 32])]);
        assert_eq!(behind.ring_version, 3);
        assert!(!behind.ring_change_is_news(2));
        let older = sec(&[1, 2]).ring_state(true);
        assert!(!behind.adopt_ring(&older));
        // A change made here goes above every version seen.
        let mut other = sec(&[1]);
        let _ = other.ring_behind(&state);
        assert_eq!(other.next_ring_version(), 4);
    }
}
