//! The join handshake as the core runs it ([`Sec`]'s half): the wall clock that stamps join
//! requests, opening whatever datagram arrives (a flock datagram, a join request to answer, the
//! answer to ours, a cookie reply), and starting a handshake under the keyring's keys.
//!
//! The exchange itself (messages, keys, cookies) is [`crate::crypto::handshake`]'s; this file
//! adds the responder's checks in WireGuard's order (destination, timestamp, replay, rate
//! limit, load) and the initiator's state (one pending handshake, cookies received).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, Header, Kind, NodeId};
use rand::{CryptoRng, RngCore};
use tracing::trace;

use super::secure::{Sec, CLOCK_SKEW_MAX, COOKIES_HELD_MAX};
use crate::crypto::{
    check, open_request, Cookie, CookieSecrets, HandshakeInitiator, HandshakeLoad, Initiation,
    InitiationStamps, Joined, Origin, Purpose, RateLimiter, Tai64N, COOKIE_REPLY_BYTES,
    COOKIE_REUSE_MAX, REPLY_BYTES, REQUEST_BYTES,
};
use crate::DropReason;

/// How long a handshake of ours waits for its reply. A reply comes within a round trip; one
/// that comes later (or to a request whose reply was lost) is unexpected, and the request is
/// forgotten: no state waits forever for an answer that an attacker could then supply.
const HANDSHAKE_REPLY_WINDOW: Duration = Duration::from_secs(3);

/// The handshake state of one node: ours (the one pending, cookies given to us, the keyring key
/// we use, our timestamps) and the ones we answer (rate limit, load, cookie secrets, the newest
/// request of each initiator).
pub(crate) struct Handshakes {
    /// Responder side: handshakes per source address.
    pub(super) limiter: RateLimiter,
    /// Initiator side: the handshake we wait on.
    pub(super) pending: Option<Pending>,
    /// Initiator side: since when our handshakes go unanswered (the first one sent since the
    /// last answer; None once one is answered).
    pub(super) unanswered_since: Option<Duration>,
    /// Which keyring key our handshakes use (index into the list, primary first).
    pub(super) key_index: usize,
    /// The newest join request taken from each initiator.
    pub(super) stamps: InitiationStamps,
    /// Responder side: the secrets cookies are made with, and the load that calls for them.
    pub(super) cookie_secrets: CookieSecrets,
    pub(super) load: HandshakeLoad,
    /// Initiator side: cookies received, by responder address, and when.
    pub(super) cookies: HashMap<SocketAddr, (Cookie, Duration)>,
    /// Wall clock: nanoseconds since the Unix epoch at core time `.0`.
    pub(super) wall: (Duration, u128),
    /// When this node started (wall clock): older join requests are refused.
    pub(super) started: Tai64N,
    /// The last timestamp this node put on a join request.
    pub(super) last_stamp: Tai64N,
}

impl Handshakes {
    /// When the handshake we wait on started (None: we wait on none).
    pub(crate) fn pending_since(&self) -> Option<Duration> {
        self.pending.as_ref().map(|p| p.started)
    }

    /// Since when our handshakes go unanswered (None: the last one was answered, or none sent).
    pub(crate) fn unanswered_since(&self) -> Option<Duration> {
        self.unanswered_since
    }
}

/// The handshake this node waits on.
pub(crate) struct Pending {
    pub(super) initiator: HandshakeInitiator,
    pub(crate) started: Duration,
    pub(super) to: SocketAddr,
    pub(super) context: Vec<u8>,
    /// Whether this request already carried a fresh cookie (a second cookie reply is not
    /// followed).
    pub(super) cookied: bool,
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

impl Sec {
    /// Sets the wall clock: `unix_nanos` nanoseconds since the Unix epoch at core time `now`
    /// (the driver reads it once at its start; without it, the boot id's start time is used).
    /// This node's start, as join requests are checked against it, moves with it.
    pub(super) fn set_wall_clock(&mut self, now: Duration, unix_nanos: u128) {
        let since_start = now.saturating_sub(self.hs.wall.0).as_nanos();
        self.hs.wall = (now, unix_nanos);
        self.hs.started = Tai64N::from_unix_nanos(unix_nanos.saturating_sub(since_start));
    }

    /// The wall-clock time at core time `now`, on the monotonic clock.
    pub(super) fn wall_at(&self, now: Duration) -> Tai64N {
        let (t0, nanos0) = self.hs.wall;
        let since = now.as_nanos() as i128 - t0.as_nanos() as i128;
        Tai64N::from_unix_nanos((nanos0 as i128 + since).max(0) as u128)
    }

    /// The timestamp of a join request made at `now`: the wall clock, strictly increasing.
    pub(super) fn next_stamp(&mut self, now: Duration) -> Tai64N {
        let t = self.wall_at(now);
        self.hs.last_stamp = if t > self.hs.last_stamp {
            t
        } else {
            self.hs.last_stamp.next()
        };
        self.hs.last_stamp
    }

    /// Opens any datagram. Handshake requests are answered (`context` goes back to the
    /// initiator), or, under load, answered with a cookie; a reply to our pending handshake
    /// completes it, and a cookie reply to it makes us send it again with the cookie.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_datagram<R: RngCore + CryptoRng>(
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
                let pending = self.hs.pending.as_ref().ok_or(DropReason::Unexpected)?;
                let joined = pending
                    .initiator
                    .finish(bytes)
                    .map_err(|e| e.drop_reason())?;
                let h = joined.header;
                if !self.replay.accept(h.sender, h.boot, h.counter) {
                    return Err(DropReason::Replay);
                }
                self.hs.pending = None;
                self.hs.unanswered_since = None;
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
    pub(super) fn on_request<R: RngCore + CryptoRng>(
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
            self.hs
                .started
                .unix_nanos()
                .saturating_sub(CLOCK_SKEW_MAX.as_nanos()),
        );
        if request.stamp < floor {
            trace!(%from, sender = %h.sender, "join request stamped before this node started");
            return Err(DropReason::OldInitiation);
        }
        // Recorded even if not answered below (no key yet, rate-limited, under load): a replay
        // of this request later gets nothing either.
        if !self.hs.stamps.accept(h.sender, h.boot, request.stamp) {
            return Err(DropReason::OldInitiation);
        }
        if !self.replay.accept(h.sender, h.boot, h.counter) {
            return Err(DropReason::Replay);
        }
        if !self.hs.limiter.allow(from.ip(), now) {
            return Err(DropReason::RateLimited);
        }
        let keys = self
            .transient
            .join_keys(now)
            .ok_or(DropReason::Unexpected)?;
        let origin = Origin {
            sender: self.id,
            boot: self.boot,
            counter: *counter + 1,
        };
        let cookie_ok = request
            .cookie
            .is_some_and(|c| self.hs.cookie_secrets.check(now, from, &c));
        if cookie_ok {
            self.hs.load.take(now);
        } else if !self.hs.load.try_take(now) {
            let cookie = self.hs.cookie_secrets.cookie(now, from, rng);
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
    pub(super) fn on_cookie_reply<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
        counter: &mut u64,
        rng: &mut R,
    ) -> Result<Opened, DropReason> {
        self.expire_pending(now);
        let pending = self.hs.pending.as_ref().ok_or(DropReason::Unexpected)?;
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
        if self.hs.cookies.len() >= COOKIES_HELD_MAX {
            self.hs.cookies.clear();
        }
        self.hs.cookies.insert(to, (cookie, now));
        *counter += 1;
        let request = self.initiate(now, *counter, to, purpose, &context, false, rng);
        Ok(Opened::Retry { to, request })
    }

    /// Forgets our handshake once [`HANDSHAKE_REPLY_WINDOW`] has passed: a reply arriving
    /// later is unexpected.
    fn expire_pending(&mut self, now: Duration) {
        if self
            .hs
            .pending
            .as_ref()
            .is_some_and(|p| now >= p.started + HANDSHAKE_REPLY_WINDOW)
        {
            self.hs.pending = None;
        }
    }

    /// Starts a handshake with `to` under the keyring's primary key; returns the request
    /// datagram (stamped with the wall clock, carrying a cookie `to` gave us lately).
    pub(super) fn start_handshake<R: RngCore + CryptoRng>(
        &mut self,
        now: Duration,
        counter: u64,
        to: SocketAddr,
        purpose: Purpose,
        context: &[u8],
        rng: &mut R,
    ) -> Vec<u8> {
        let next_key = self.hs.pending.is_some();
        self.initiate(now, counter, to, purpose, context, next_key, rng)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn initiate<R: RngCore + CryptoRng>(
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
            .hs
            .cookies
            .get(&to)
            .filter(|(_, at)| now.saturating_sub(*at) < COOKIE_REUSE_MAX)
            .map(|(c, _)| *c);
        // The primary key first; while handshakes go unanswered, the other installed keys in
        // turn (a node whose primary was removed from the flock's ring while it was away still
        // gets in with another key the flock holds). A retry with a cookie keeps the key.
        if next_key {
            self.hs.key_index = self.hs.key_index.wrapping_add(1);
        }
        let stamp = self.next_stamp(now);
        let keys = self.keyring.list();
        let secondary = keys[self.hs.key_index % keys.len()];
        let initiation = Initiation {
            purpose,
            origin,
            to,
            stamp,
            cookie,
            context,
        };
        let (initiator, request) = HandshakeInitiator::new(rng, secondary, &self.bloc, &initiation);
        self.hs.unanswered_since.get_or_insert(now);
        self.hs.pending = Some(Pending {
            initiator,
            started: now,
            to,
            context: context.to_vec(),
            cookied: cookie.is_some(),
        });
        request
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
