//! The join handshake: how a node holding a secondary key obtains the current transient key.
//!
//! ```text
//! initiator                                        responder (holds the transient key)
//!   e_i ← random x25519 secret
//!   JoinRequest ─ seal(handshake key, [1, purpose, E_i, timestamp, destination,
//!                                      cookie?, context, zero padding]) ─▶
//!                                   open with the key the key id names (no x25519 yet)
//!                                   destination ≠ own address            → drop (misdirected)
//!                                   timestamp not newer for this sender  → drop (old_initiation)
//!                                   source over its rate                 → drop (rate_limited)
//!                                   under load and no valid cookie:
//!   ◀─ CookieReply ─ seal(handshake key, [3, cookie, digest of the request])
//!   (the same handshake again, with the cookie) ─▶
//!                                   e_r ← random; s = X25519(e_r, E_i)
//!                                   k = HKDF(bloc, secondary ‖ s ‖ T, "join-reply")
//!   ◀─ JoinReply ─ seal(handshake key, [2, E_r, AEAD(k, current ‖ previous key ‖ context)])
//!   s = X25519(e_i, E_r); same k; open
//! ```
//!
//! `T` is the transcript hash: SHA-256 of the request datagram, the reply's header and `E_r`, so
//! a reply only opens for the request it answers. All three datagrams are [`Kind::Handshake`] and
//! sealed under the handshake key derived from the secondary key (the header's `key_id` names
//! which secondary key); outsiders see nothing but sizes. The transient key itself is sealed under
//! `k`, which needs one of the ephemeral secrets: someone who records the exchange and later
//! learns the secondary key opens both outer layers, sees `E_i` and `E_r`, and still cannot
//! compute `s`. The ephemeral secrets live only in memory and are wiped on drop.
//!
//! # No answer to what does not authenticate (WireGuard's rules)
//!
//! * **Nothing that fails to open is answered**, nor anything that opens but is refused below:
//!   the responder sends a JoinReply or a CookieReply only to a request that authenticated under
//!   one of its secondary keys and passed every check. [`open_request`] does no x25519 work.
//! * **Destination.** A request names the address it is sent to ([`Initiation::to`]); the
//!   responder refuses one that names any other address than its own flock address
//!   ([`DropReason::Misdirected`]). A request recorded on its way to another node, or caught at
//!   an address where no node listens (discovery probes the whole address space), is worth
//!   nothing anywhere else. (WireGuard gets this from encrypting the initiation to the
//!   responder's static key; the flock has no per-node keys, and a discovery probe does not know
//!   who, if anyone, listens at the address.)
//! * **Timestamp.** A request carries a TAI64N-style timestamp ([`Tai64N`]): the initiator's wall
//!   clock, read once by the driver at start ([`crate::Flock::set_wall_clock`]; the boot id's
//!   start time otherwise) and counted from there on the core's monotonic `now`, strictly
//!   increasing. The responder keeps, per sender **node id**, the greatest `(boot id, timestamp)`
//!   it took ([`InitiationStamps`](super::InitiationStamps)) and refuses any request not greater
//!   ([`DropReason::OldInitiation`]): a replayed request, or an older one, is dropped silently. A
//!   node's boot ids grow across restarts, so a restarted node is taken at once, even if its wall
//!   clock stepped back. The stamp is recorded as soon as the request authenticated, before the
//!   rate limit, the load check and the no-key case, so a request that was not answered then is
//!   not answered when replayed later either. So that a restarted responder (whose table is
//!   empty) does not answer requests recorded before it started, it also refuses requests stamped
//!   more than [`CLOCK_SKEW_MAX`](crate::CLOCK_SKEW_MAX) (10 s) before its own start: nodes'
//!   clocks must agree within that (NTP keeps them within milliseconds); a node whose clock lags
//!   further is refused by a node that started less than the lag ago, and by nobody else.
//! * **Cookie under load.** A responder that is answering more than
//!   [`HANDSHAKES_UNDER_LOAD`](super::HANDSHAKES_UNDER_LOAD) (100) requests a second answers a
//!   request that carries no valid cookie with a CookieReply ([`Request::cookie_reply`],
//!   [`COOKIE_REPLY_BYTES`]) instead of doing the x25519 work ([`DropReason::UnderLoad`]). The
//!   cookie is a MAC of the request's source address and port under a secret that changes every
//!   two minutes ([`CookieSecrets`](super::CookieSecrets)); the initiator
//!   ([`HandshakeInitiator::finish_cookie`]) sends the same handshake again at once with the
//!   cookie echoed inside the sealed body, which proves it receives at that source address, and
//!   keeps the cookie for the next requests to that address. Per-source rate limits (20 a second,
//!   burst 5) apply whatever the cookie.
//! * **Never larger than the request.** The request is padded to [`REQUEST_BYTES`] (268); the
//!   JoinReply is [`REPLY_BYTES`] (263), the CookieReply [`COOKIE_REPLY_BYTES`] (109): a forged
//!   source address gains no amplification.
//!
//! Each side may attach up to [`MAX_CONTEXT_BYTES`] of its own (the core's leader claim, say):
//! when two flocks that formed apart meet, their members hold different transient keys, and the
//! contexts let both sides of a key request see whose flock wins and which side adopts the
//! other's keys.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};
use crux_proto::flock::{BootId, Header, Kind, NodeId, HEADER_BYTES};

use super::cookie::{Cookie, COOKIE_BYTES};
use super::envelope::{check, open, seal, sealed_len, OpenError, TAG_BYTES};
use super::keyring::Keyring;
use super::keys::{ct_eq, key_id, label, Bloc, PacketKey, SecretKey};
use super::transient::{JoinKeys, KeyAnnouncement, TransientKeys, ANNOUNCEMENT_BYTES};
use crate::DropReason;

const TYPE_REQUEST: u8 = 1;
const TYPE_REPLY: u8 = 2;
const TYPE_COOKIE: u8 = 3;
const PUBLIC_BYTES: usize = 32;
/// Bytes of a destination address in a request: the IPv6 (or IPv4-mapped) address, the port.
const ADDR_BYTES: usize = 18;
/// Bytes of the digest of a request a cookie reply names.
const REQUEST_DIGEST_BYTES: usize = 16;

/// Most bytes of context each side may attach (the core's own business: its leader claim, say,
/// so that two flocks that formed apart can decide whose keys win). Authenticated under the
/// handshake key; the reply's context is also sealed under the ephemeral key.
pub const MAX_CONTEXT_BYTES: usize = 64;
/// Plaintext bytes of a join request: type, purpose, the ephemeral public key, the timestamp,
/// the destination, the echoed cookie, the context's length and its bytes, zero padding (so that
/// the request is larger than any reply).
pub const REQUEST_BODY_BYTES: usize = 192;
const REQUEST_PUBLIC_AT: usize = 2;
const REQUEST_STAMP_AT: usize = REQUEST_PUBLIC_AT + PUBLIC_BYTES;
const REQUEST_TO_AT: usize = REQUEST_STAMP_AT + TAI64N_BYTES;
const REQUEST_COOKIE_AT: usize = REQUEST_TO_AT + ADDR_BYTES;
const REQUEST_CONTEXT_AT: usize = REQUEST_COOKIE_AT + 1 + COOKIE_BYTES;
/// Bytes of the sealed keys inside a reply: a flag (previous key present), the current and
/// the previous epoch and key ([`JoinKeys`]; zeros when there is no previous key).
const KEYS_BYTES: usize = 1 + 2 * ANNOUNCEMENT_BYTES;
/// Bytes sealed under the ephemeral key in a reply: the keys, the context's length and bytes.
const INNER_BYTES: usize = KEYS_BYTES + 1 + MAX_CONTEXT_BYTES;
/// Plaintext bytes of a join reply: type, the ephemeral public key, the sealed keys and context.
pub const REPLY_BODY_BYTES: usize = 1 + PUBLIC_BYTES + INNER_BYTES + TAG_BYTES;
/// Plaintext bytes of a cookie reply: type, the cookie, the digest of the request it answers.
pub const COOKIE_BODY_BYTES: usize = 1 + COOKIE_BYTES + REQUEST_DIGEST_BYTES;
/// Bytes of a join request datagram.
pub const REQUEST_BYTES: usize = sealed_len(REQUEST_BODY_BYTES);
/// Bytes of a join reply datagram (never more than [`REQUEST_BYTES`]).
pub const REPLY_BYTES: usize = sealed_len(REPLY_BODY_BYTES);
/// Bytes of a cookie reply datagram (less than [`REQUEST_BYTES`]).
pub const COOKIE_REPLY_BYTES: usize = sealed_len(COOKIE_BODY_BYTES);

const _: () = assert!(REPLY_BYTES <= REQUEST_BYTES);
const _: () = assert!(COOKIE_REPLY_BYTES < REQUEST_BYTES);
const _: () = assert!(COOKIE_REPLY_BYTES != REPLY_BYTES);
const _: () = assert!(REQUEST_CONTEXT_AT + 1 + MAX_CONTEXT_BYTES <= REQUEST_BODY_BYTES);

/// Bytes of a [`Tai64N`] on the wire.
pub const TAI64N_BYTES: usize = 12;
/// The TAI64 label of the Unix epoch (2^62; leap seconds are not counted: "TAI64N-style").
const TAI64_EPOCH: u64 = 1 << 62;

/// A TAI64N-style timestamp, as in WireGuard's handshake initiation: 8 bytes of seconds (2^62 +
/// seconds since the Unix epoch) and 4 bytes of nanoseconds, both big-endian, so that byte order
/// is time order. The flock core stamps each initiation with its wall-clock time, counted on a
/// monotonic clock from the node's start ([`crate::Flock`] takes the wall time of its start from
/// the driver, or from the boot id), strictly increasing within one boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tai64N {
    secs: u64,
    nanos: u32,
}

impl Tai64N {
    /// The timestamp of `nanos` nanoseconds since the Unix epoch.
    pub fn from_unix_nanos(nanos: u128) -> Tai64N {
        let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX >> 2);
        Tai64N {
            secs: TAI64_EPOCH + secs.min((u64::MAX >> 2) - 1),
            nanos: (nanos % 1_000_000_000) as u32,
        }
    }

    /// Nanoseconds since the Unix epoch (0 for times before it).
    pub fn unix_nanos(&self) -> u128 {
        u128::from(self.secs.saturating_sub(TAI64_EPOCH)) * 1_000_000_000 + u128::from(self.nanos)
    }

    /// The next timestamp after this one (one nanosecond later).
    pub fn next(&self) -> Tai64N {
        Tai64N::from_unix_nanos(self.unix_nanos() + 1)
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; TAI64N_BYTES] {
        let mut b = [0u8; TAI64N_BYTES];
        b[..8].copy_from_slice(&self.secs.to_be_bytes());
        b[8..].copy_from_slice(&self.nanos.to_be_bytes());
        b
    }

    /// Parses the wire form; nanoseconds must be below 10^9.
    pub fn decode(bytes: &[u8]) -> Result<Tai64N, OpenError> {
        if bytes.len() != TAI64N_BYTES {
            return Err(OpenError::Malformed);
        }
        let secs = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let nanos = u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes"));
        if nanos >= 1_000_000_000 {
            return Err(OpenError::Malformed);
        }
        Ok(Tai64N { secs, nanos })
    }
}

fn put_addr(addr: SocketAddr, out: &mut [u8]) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[..16].copy_from_slice(&ip.octets());
    out[16..ADDR_BYTES].copy_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(bytes: &[u8]) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes[..16]);
    let v6 = Ipv6Addr::from(octets);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(
        ip,
        u16::from_be_bytes(bytes[16..ADDR_BYTES].try_into().expect("2 bytes")),
    )
}

/// Writes `len || context || zeros` into `out` (`1 + MAX_CONTEXT_BYTES` bytes).
fn put_context(context: &[u8], out: &mut [u8]) {
    assert!(
        context.len() <= MAX_CONTEXT_BYTES,
        "handshake context is {} bytes, over {MAX_CONTEXT_BYTES}",
        context.len()
    );
    out[0] = context.len() as u8;
    out[1..1 + context.len()].copy_from_slice(context);
}

/// Reads what [`put_context`] wrote; everything after the context (to the end of `bytes`) must
/// be zero.
fn get_context(bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    let len = bytes[0] as usize;
    if len > MAX_CONTEXT_BYTES || bytes[1 + len..].iter().any(|b| *b != 0) {
        return Err(OpenError::Malformed);
    }
    Ok(bytes[1..1 + len].to_vec())
}

/// Why the node asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A node that is not in the flock yet.
    Join = 0,
    /// A member that missed rotations (paused, partitioned, restarted) asks for the key again.
    KeyRequest = 1,
}

/// The sender fields of a handshake datagram's header (the rest is filled in: kind, bloc tag,
/// key id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// This node's id.
    pub sender: NodeId,
    /// This node's boot id.
    pub boot: BootId,
    /// This node's next datagram counter (the same counter as its flock datagrams).
    pub counter: u64,
}

/// What one join request says, besides its ephemeral key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initiation<'a> {
    /// Why the node asks.
    pub purpose: Purpose,
    /// The header's sender fields.
    pub origin: Origin,
    /// The address the request is sent to: the responder refuses a request addressed to any
    /// other address than its own (one recorded on its way elsewhere).
    pub to: SocketAddr,
    /// When the request was made: the responder refuses one not newer than the last it took
    /// from the same sender.
    pub stamp: Tai64N,
    /// The cookie `to` gave this node, if it asked for one (reused for
    /// [`COOKIE_REUSE_MAX`](super::COOKIE_REUSE_MAX)).
    pub cookie: Option<Cookie>,
    /// Up to [`MAX_CONTEXT_BYTES`] for the responder ([`Request::context`]).
    pub context: &'a [u8],
}

/// Why a handshake datagram was not accepted. Comes from the network, except
/// [`HandshakeError::NoTransientKey`] (this node cannot answer); changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The datagram failed a check of the envelope, or its body is not a handshake message.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// This node holds no fresh transient key to hand out.
    #[error("no fresh transient key to hand out")]
    NoTransientKey,
}

impl HandshakeError {
    /// The drop counter for this failure.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            HandshakeError::Open(e) => e.drop_reason(),
            HandshakeError::NoTransientKey => DropReason::Unexpected,
        }
    }
}

impl From<HandshakeError> for DropReason {
    fn from(e: HandshakeError) -> DropReason {
        e.drop_reason()
    }
}

fn handshake_header(bloc: &Bloc, key_id: u32, origin: Origin) -> Header {
    Header {
        kind: Kind::Handshake,
        bloc_tag: bloc.tag(),
        key_id,
        sender: origin.sender,
        boot: origin.boot,
        counter: origin.counter,
    }
}

fn transcript_start(request: &[u8]) -> Sha256 {
    let mut t = Sha256::new();
    t.update(b"crux-flock/v1/join-transcript\0");
    t.update(request);
    t
}

fn transcript_end(mut t: Sha256, reply_header: &[u8], responder_public: &[u8]) -> [u8; 32] {
    t.update(reply_header);
    t.update(responder_public);
    t.finalize().into()
}

/// The digest of a request a cookie reply names, so that it completes nothing else.
fn request_digest(request: &[u8]) -> [u8; REQUEST_DIGEST_BYTES] {
    let mut t = Sha256::new();
    t.update(b"crux-flock/v1/cookie-request\0");
    t.update(request);
    let d = t.finalize();
    let mut out = [0u8; REQUEST_DIGEST_BYTES];
    out.copy_from_slice(&d[..REQUEST_DIGEST_BYTES]);
    out
}

fn reply_key(
    bloc: &Bloc,
    secondary: &SecretKey,
    shared: &[u8; 32],
    transcript: &[u8],
) -> PacketKey {
    PacketKey::from_derived(&bloc.derive(
        &[secondary.as_bytes(), shared, transcript],
        label::JOIN_REPLY,
    ))
}

/// The checks every handshake datagram gets: size and kind, then the envelope checks
/// (`max_bytes` is the exact size expected).
fn check_handshake(bytes: &[u8], size: usize, bloc: &Bloc) -> Result<Header, OpenError> {
    if bytes.len() > size {
        return Err(OpenError::Oversized {
            len: bytes.len(),
            limit: size,
        });
    }
    let header = check(bytes, size, bloc.tag())?;
    if bytes.len() != size {
        return Err(OpenError::Truncated(bytes.len()));
    }
    if header.kind != Kind::Handshake {
        return Err(OpenError::Malformed);
    }
    Ok(header)
}

/// The joining side of one handshake: holds the ephemeral secret until a reply arrives.
pub struct HandshakeInitiator {
    bloc: Bloc,
    secondary: SecretKey,
    key_id: u32,
    packet: PacketKey,
    ephemeral: StaticSecret,
    transcript: Sha256,
    digest: [u8; REQUEST_DIGEST_BYTES],
    purpose: Purpose,
}

impl std::fmt::Debug for HandshakeInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeInitiator")
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

impl HandshakeInitiator {
    /// Starts a handshake under `secondary` (the keyring's primary key): returns the state to keep
    /// and the request datagram ([`REQUEST_BYTES`] bytes) to send to `initiation.to` (and only
    /// there: it is refused at any other address). Any reply to it completes the state.
    ///
    /// Panics if the context is longer than [`MAX_CONTEXT_BYTES`].
    pub fn new<R: RngCore + CryptoRng>(
        rng: &mut R,
        secondary: &SecretKey,
        bloc: &Bloc,
        initiation: &Initiation<'_>,
    ) -> (HandshakeInitiator, Vec<u8>) {
        let ephemeral = StaticSecret::random_from_rng(&mut *rng);
        let public = PublicKey::from(&ephemeral);
        let id = key_id(secondary, bloc);
        let packet = PacketKey::handshake(secondary, bloc);
        let mut body = [0u8; REQUEST_BODY_BYTES];
        body[0] = TYPE_REQUEST;
        body[1] = initiation.purpose as u8;
        body[REQUEST_PUBLIC_AT..REQUEST_STAMP_AT].copy_from_slice(public.as_bytes());
        body[REQUEST_STAMP_AT..REQUEST_TO_AT].copy_from_slice(&initiation.stamp.encode());
        put_addr(initiation.to, &mut body[REQUEST_TO_AT..REQUEST_COOKIE_AT]);
        if let Some(cookie) = &initiation.cookie {
            body[REQUEST_COOKIE_AT] = 1;
            body[REQUEST_COOKIE_AT + 1..REQUEST_CONTEXT_AT].copy_from_slice(cookie);
        }
        put_context(initiation.context, &mut body[REQUEST_CONTEXT_AT..]);
        let mut request = Vec::with_capacity(REQUEST_BYTES);
        seal(
            &packet,
            &handshake_header(bloc, id, initiation.origin),
            &body,
            rng,
            &mut request,
        );
        let state = HandshakeInitiator {
            bloc: bloc.clone(),
            secondary: secondary.clone(),
            key_id: id,
            packet,
            ephemeral,
            transcript: transcript_start(&request),
            digest: request_digest(&request),
            purpose: initiation.purpose,
        };
        (state, request)
    }

    /// Why this handshake was started.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The key id of the secondary key this handshake uses.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Opens a reply: its (authenticated) header, the transient keys it carries (install them
    /// with [`TransientKeys::install`]) and the responder's context. Any failure is a drop
    /// ([`HandshakeError::drop_reason`]); the state stays usable for another reply to the same
    /// request.
    pub fn finish(&self, reply: &[u8]) -> Result<Joined, HandshakeError> {
        let header = check_handshake(reply, REPLY_BYTES, &self.bloc)?;
        if header.key_id != self.key_id {
            return Err(OpenError::UnknownKey(header.key_id).into());
        }
        let mut body = Zeroizing::new(Vec::with_capacity(REPLY_BODY_BYTES));
        open(&self.packet, reply, &mut body)?;
        if body.len() != REPLY_BODY_BYTES || body[0] != TYPE_REPLY {
            return Err(OpenError::Malformed.into());
        }
        let mut public = [0u8; PUBLIC_BYTES];
        public.copy_from_slice(&body[1..1 + PUBLIC_BYTES]);
        let shared = self.ephemeral.diffie_hellman(&PublicKey::from(public));
        if !shared.was_contributory() {
            return Err(OpenError::AuthFailed.into());
        }
        let transcript = transcript_end(self.transcript.clone(), &reply[..HEADER_BYTES], &public);
        let key = reply_key(&self.bloc, &self.secondary, shared.as_bytes(), &transcript);
        let sealed = &body[1 + PUBLIC_BYTES..];
        let mut plain = Zeroizing::new([0u8; INNER_BYTES]);
        plain.copy_from_slice(&sealed[..INNER_BYTES]);
        key.cipher
            .decrypt_in_place_detached(
                &XNonce::default(),
                &transcript,
                &mut plain[..],
                Tag::from_slice(&sealed[INNER_BYTES..]),
            )
            .map_err(|_| OpenError::AuthFailed)?;
        Ok(Joined {
            header,
            keys: decode_keys(&plain[..KEYS_BYTES])?,
            context: get_context(&plain[KEYS_BYTES..])?,
        })
    }

    /// Opens a cookie reply to this request ([`COOKIE_REPLY_BYTES`]): its authenticated header and
    /// the cookie to echo in the next request to the same address. A cookie reply to any other
    /// request fails ([`OpenError::AuthFailed`]).
    pub fn finish_cookie(&self, reply: &[u8]) -> Result<(Header, Cookie), HandshakeError> {
        let header = check_handshake(reply, COOKIE_REPLY_BYTES, &self.bloc)?;
        if header.key_id != self.key_id {
            return Err(OpenError::UnknownKey(header.key_id).into());
        }
        let mut body = Vec::with_capacity(COOKIE_BODY_BYTES);
        open(&self.packet, reply, &mut body)?;
        if body.len() != COOKIE_BODY_BYTES || body[0] != TYPE_COOKIE {
            return Err(OpenError::Malformed.into());
        }
        if !ct_eq(&body[1 + COOKIE_BYTES..], &self.digest) {
            return Err(OpenError::AuthFailed.into());
        }
        let mut cookie = [0u8; COOKIE_BYTES];
        cookie.copy_from_slice(&body[1..1 + COOKIE_BYTES]);
        Ok((header, cookie))
    }
}

/// A completed handshake, as the initiator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The reply's authenticated header (the responder's id, boot and counter: record it with
    /// [`ReplayTable::accept`](super::ReplayTable::accept)).
    pub header: Header,
    /// The transient keys ([`TransientKeys::join_keys`] of the responder).
    pub keys: JoinKeys,
    /// The responder's context.
    pub context: Vec<u8>,
}

fn encode_keys(keys: &JoinKeys, out: &mut [u8]) {
    out[0] = keys.previous.is_some() as u8;
    out[1..1 + ANNOUNCEMENT_BYTES].copy_from_slice(&Zeroizing::new(keys.current.encode())[..]);
    if let Some(prev) = &keys.previous {
        out[1 + ANNOUNCEMENT_BYTES..].copy_from_slice(&Zeroizing::new(prev.encode())[..]);
    }
}

fn decode_keys(bytes: &[u8]) -> Result<JoinKeys, OpenError> {
    let current = KeyAnnouncement::decode(&bytes[1..1 + ANNOUNCEMENT_BYTES])?;
    let rest = &bytes[1 + ANNOUNCEMENT_BYTES..];
    let previous = match bytes[0] {
        0 if rest.iter().all(|b| *b == 0) => None,
        1 => Some(KeyAnnouncement::decode(rest)?),
        _ => return Err(OpenError::Malformed),
    };
    Ok(JoinKeys { current, previous })
}

/// A join request that authenticated: what it says, and what a reply to it needs. Made by
/// [`open_request`]; answered with [`Request::answer`] (the x25519 work) or
/// [`Request::cookie_reply`] (under load).
///
/// Opening checks only what the request itself shows; the caller checks, in this order and before
/// answering, that it is addressed to this node ([`Request::to`]), that it is newer than the last
/// one taken from its sender ([`InitiationStamps`](super::InitiationStamps)), the per-source rate
/// limit, and the load.
pub struct Request {
    /// The request's authenticated header.
    pub header: Header,
    /// Why the initiator asks.
    pub purpose: Purpose,
    /// When the initiator made it.
    pub stamp: Tai64N,
    /// The address the initiator sent it to.
    pub to: SocketAddr,
    /// The cookie it echoes, if any.
    pub cookie: Option<Cookie>,
    /// The initiator's context.
    pub context: Vec<u8>,
    their: [u8; PUBLIC_BYTES],
    bloc: Bloc,
    secondary: SecretKey,
    packet: PacketKey,
    transcript: Sha256,
    digest: [u8; REQUEST_DIGEST_BYTES],
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("header", &self.header)
            .field("purpose", &self.purpose)
            .field("stamp", &self.stamp)
            .field("to", &self.to)
            .field("cookie", &self.cookie.is_some())
            .finish_non_exhaustive()
    }
}

/// Authenticates a join request (or key request) and reads it, without any x25519 work.
///
/// Checks in order: size (exactly [`REQUEST_BYTES`]), header and bloc tag, kind, then the key the
/// header's key id names in `keyring` ([`OpenError::UnknownKey`] if none: one key, one decryption
/// attempt), then the body ([`OpenError::Malformed`]). Nothing is answered here and no state
/// changes.
pub fn open_request(
    keyring: &Keyring,
    bloc: &Bloc,
    request: &[u8],
) -> Result<Request, HandshakeError> {
    let header = check_handshake(request, REQUEST_BYTES, bloc)?;
    let (secondary, packet) = keyring
        .by_key_id(header.key_id, bloc)
        .ok_or(OpenError::UnknownKey(header.key_id))?;
    let mut body = Zeroizing::new(Vec::with_capacity(REQUEST_BODY_BYTES));
    open(&packet, request, &mut body)?;
    if body.len() != REQUEST_BODY_BYTES || body[0] != TYPE_REQUEST {
        return Err(OpenError::Malformed.into());
    }
    let purpose = match body[1] {
        0 => Purpose::Join,
        1 => Purpose::KeyRequest,
        _ => return Err(OpenError::Malformed.into()),
    };
    let stamp = Tai64N::decode(&body[REQUEST_STAMP_AT..REQUEST_TO_AT])?;
    let to = get_addr(&body[REQUEST_TO_AT..REQUEST_COOKIE_AT]);
    let cookie_bytes = &body[REQUEST_COOKIE_AT + 1..REQUEST_CONTEXT_AT];
    let cookie = match body[REQUEST_COOKIE_AT] {
        0 if cookie_bytes.iter().all(|b| *b == 0) => None,
        1 => {
            let mut c = [0u8; COOKIE_BYTES];
            c.copy_from_slice(cookie_bytes);
            Some(c)
        }
        _ => return Err(OpenError::Malformed.into()),
    };
    let context = get_context(&body[REQUEST_CONTEXT_AT..])?;
    let mut their = [0u8; PUBLIC_BYTES];
    their.copy_from_slice(&body[REQUEST_PUBLIC_AT..REQUEST_STAMP_AT]);
    Ok(Request {
        header,
        purpose,
        stamp,
        to,
        cookie,
        context,
        their,
        bloc: bloc.clone(),
        secondary: secondary.clone(),
        packet,
        transcript: transcript_start(request),
        digest: request_digest(request),
    })
}

impl Request {
    /// Answers with the transient keys (`None`: this node holds no fresh key, and the answer is
    /// [`HandshakeError::NoTransientKey`]): the x25519 exchange, then a reply of [`REPLY_BYTES`]
    /// that only the initiator of this request can open. `context` (at most
    /// [`MAX_CONTEXT_BYTES`]) reaches the initiator in [`Joined::context`].
    ///
    /// Panics if `context` is longer than [`MAX_CONTEXT_BYTES`].
    pub fn answer<R: RngCore + CryptoRng>(
        &self,
        keys: Option<&JoinKeys>,
        origin: Origin,
        context: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, HandshakeError> {
        let keys = keys.ok_or(HandshakeError::NoTransientKey)?;
        let ephemeral = StaticSecret::random_from_rng(&mut *rng);
        let public = PublicKey::from(&ephemeral);
        let shared = ephemeral.diffie_hellman(&PublicKey::from(self.their));
        if !shared.was_contributory() {
            return Err(OpenError::Malformed.into());
        }
        let reply_header = handshake_header(&self.bloc, self.header.key_id, origin);
        let mut header_bytes = Vec::with_capacity(HEADER_BYTES);
        reply_header.write(&mut header_bytes);
        let transcript = transcript_end(self.transcript.clone(), &header_bytes, public.as_bytes());
        let key = reply_key(&self.bloc, &self.secondary, shared.as_bytes(), &transcript);

        let mut reply_body = Zeroizing::new([0u8; REPLY_BODY_BYTES]);
        reply_body[0] = TYPE_REPLY;
        reply_body[1..1 + PUBLIC_BYTES].copy_from_slice(public.as_bytes());
        let sealed = &mut reply_body[1 + PUBLIC_BYTES..];
        encode_keys(keys, &mut sealed[..KEYS_BYTES]);
        put_context(context, &mut sealed[KEYS_BYTES..INNER_BYTES]);
        // The key k is used exactly once (e_r is fresh for every reply), so a fixed nonce is safe.
        let tag = key
            .cipher
            .encrypt_in_place_detached(&XNonce::default(), &transcript, &mut sealed[..INNER_BYTES])
            .expect("a few bytes are within the AEAD's limits");
        sealed[INNER_BYTES..].copy_from_slice(&tag);
        let mut reply = Vec::with_capacity(REPLY_BYTES);
        seal(
            &self.packet,
            &reply_header,
            &reply_body[..],
            rng,
            &mut reply,
        );
        Ok(reply)
    }

    /// A cookie reply ([`COOKIE_REPLY_BYTES`], smaller than the request) carrying `cookie` for
    /// the request's source: no x25519 work.
    pub fn cookie_reply<R: RngCore + CryptoRng>(
        &self,
        cookie: &Cookie,
        origin: Origin,
        rng: &mut R,
    ) -> Vec<u8> {
        let mut body = [0u8; COOKIE_BODY_BYTES];
        body[0] = TYPE_COOKIE;
        body[1..1 + COOKIE_BYTES].copy_from_slice(cookie);
        body[1 + COOKIE_BYTES..].copy_from_slice(&self.digest);
        let header = handshake_header(&self.bloc, self.header.key_id, origin);
        let mut reply = Vec::with_capacity(COOKIE_REPLY_BYTES);
        seal(&self.packet, &header, &body, rng, &mut reply);
        reply
    }
}

/// What a responder answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's authenticated header: check it against the replay table
    /// ([`ReplayTable::accept`](super::ReplayTable::accept)) before sending the reply.
    pub request: Header,
    /// Why the initiator asks.
    pub purpose: Purpose,
    /// When the initiator made the request.
    pub stamp: Tai64N,
    /// Where the initiator sent it.
    pub to: SocketAddr,
    /// The initiator's context.
    pub context: Vec<u8>,
    /// The reply datagram ([`REPLY_BYTES`] bytes, never more than the request).
    pub reply: Vec<u8>,
}

/// Answers a join request (or key request) with the responder's own transient key and a second
/// one of its leader ([`TransientKeys::join_keys`]): [`open_request`], then
/// [`Request::answer`] with the keys fresh at `now`.
///
/// A pure function: it does not check the request's destination nor its timestamp, which need
/// the responder's address and state (the flock core does, see [`Request`]). The caller
/// rate-limits by source address ([`RateLimiter`](super::RateLimiter)), and sends nothing on
/// error. `context` (at most [`MAX_CONTEXT_BYTES`]) reaches the initiator in [`Joined::context`].
///
/// Panics if `context` is longer than [`MAX_CONTEXT_BYTES`].
#[allow(clippy::too_many_arguments)]
pub fn respond<R: RngCore + CryptoRng>(
    keyring: &Keyring,
    bloc: &Bloc,
    request: &[u8],
    transient: &TransientKeys,
    now: std::time::Duration,
    origin: Origin,
    context: &[u8],
    rng: &mut R,
) -> Result<Response, HandshakeError> {
    let keys = transient.join_keys(now);
    respond_with(keyring, bloc, request, keys.as_ref(), origin, context, rng)
}

/// [`respond`] with the transient keys to hand out given directly (`None`: this node holds no
/// fresh key, and the answer is [`HandshakeError::NoTransientKey`] once the request checked out).
pub fn respond_with<R: RngCore + CryptoRng>(
    keyring: &Keyring,
    bloc: &Bloc,
    request: &[u8],
    keys: Option<&JoinKeys>,
    origin: Origin,
    context: &[u8],
    rng: &mut R,
) -> Result<Response, HandshakeError> {
    let r = open_request(keyring, bloc, request)?;
    let reply = r.answer(keys, origin, context, rng)?;
    Ok(Response {
        request: r.header,
        purpose: r.purpose,
        stamp: r.stamp,
        to: r.to,
        context: r.context,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::transient::ROTATION_MAX;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::time::Duration;

    const NOW: Duration = Duration::from_secs(100);

    fn origin(n: u64) -> Origin {
        Origin {
            sender: NodeId(n),
            boot: BootId(n + 100),
            counter: 1,
        }
    }

    /// Where the test requests go.
    fn to() -> SocketAddr {
        "127.0.0.2:7700".parse().unwrap()
    }

    /// When the test requests are made.
    const STAMP_NANOS: u128 = 1_700_000_000_123_456_789;

    /// A request of node 1 to [`to`], stamped [`STAMP_NANOS`].
    fn init(purpose: Purpose, context: &[u8]) -> Initiation<'_> {
        Initiation {
            purpose,
            origin: origin(1),
            to: to(),
            stamp: Tai64N::from_unix_nanos(STAMP_NANOS),
            cookie: None,
            context,
        }
    }

    struct World {
        rng: ChaCha20Rng,
        bloc: Bloc,
        secondary: SecretKey,
        keyring: Keyring,
        transient: TransientKeys,
    }

    fn world() -> World {
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let bloc = Bloc::new("bloc-a");
        let secondary = SecretKey::generate(&mut rng);
        let keyring = Keyring::new(secondary.clone());
        let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        transient.install(77, SecretKey::generate(&mut rng), NodeId(2), NOW, false);
        transient.set_own(77);
        World {
            rng,
            bloc,
            secondary,
            keyring,
            transient,
        }
    }

    impl World {
        /// Node 1 starts a handshake under the world's secondary key.
        fn initiate(&mut self, purpose: Purpose, context: &[u8]) -> (HandshakeInitiator, Vec<u8>) {
            HandshakeInitiator::new(
                &mut self.rng,
                &self.secondary,
                &self.bloc,
                &init(purpose, context),
            )
        }

        /// Node 2 answers `request` at `now` with the world's keyring and transient keys.
        fn respond_at(
            &mut self,
            request: &[u8],
            now: Duration,
            context: &[u8],
        ) -> Result<Response, HandshakeError> {
            respond(
                &self.keyring,
                &self.bloc,
                request,
                &self.transient,
                now,
                origin(2),
                context,
                &mut self.rng,
            )
        }

        /// [`respond_at`](Self::respond_at) at [`NOW`], with no context.
        fn respond(&mut self, request: &[u8]) -> Result<Response, HandshakeError> {
            self.respond_at(request, NOW, b"")
        }
    }

    fn exchange(w: &mut World) -> (HandshakeInitiator, Vec<u8>, Response) {
        let (state, request) = w.initiate(Purpose::Join, b"");
        let resp = w.respond(&request).unwrap();
        (state, request, resp)
    }

    #[test]
    fn sizes() {
        assert_eq!(REQUEST_BYTES, 268);
        assert_eq!(REPLY_BYTES, 263);
        assert_eq!(COOKIE_REPLY_BYTES, 109);
    }

    #[test]
    fn tai64n_orders_like_time_and_round_trips() {
        let a = Tai64N::from_unix_nanos(STAMP_NANOS);
        let b = a.next();
        assert!(b > a);
        assert!(a.encode() < b.encode(), "byte order is time order");
        assert_eq!(Tai64N::decode(&a.encode()).unwrap(), a);
        assert_eq!(a.unix_nanos(), STAMP_NANOS);
        assert_eq!(
            &a.encode()[..8],
            &((1u64 << 62) + 1_700_000_000).to_be_bytes()
        );
        let mut bad = a.encode();
        bad[8..].copy_from_slice(&1_000_000_000u32.to_be_bytes());
        assert_eq!(Tai64N::decode(&bad), Err(OpenError::Malformed));
        let from_zero = Tai64N::from_unix_nanos(999_999_999).next();
        assert_eq!(from_zero.unix_nanos(), 1_000_000_000);
    }

    #[test]
    fn a_request_carries_its_stamp_destination_cookie_and_context() {
        let mut w = world();
        let mut i = init(Purpose::KeyRequest, b"ctx");
        i.cookie = Some([5; COOKIE_BYTES]);
        let v6: SocketAddr = "[fd00::1]:7700".parse().unwrap();
        for to in [to(), v6] {
            i.to = to;
            let (_, request) = HandshakeInitiator::new(&mut w.rng, &w.secondary, &w.bloc, &i);
            let r = open_request(&w.keyring, &w.bloc, &request).unwrap();
            assert_eq!(r.purpose, Purpose::KeyRequest);
            assert_eq!(r.stamp, Tai64N::from_unix_nanos(STAMP_NANOS));
            assert_eq!(r.to, to);
            assert_eq!(r.cookie, Some([5; COOKIE_BYTES]));
            assert_eq!(r.context, b"ctx");
            assert_eq!(r.header.sender, NodeId(1));
        }
        // Without a cookie, the cookie field is all zero (and must be).
        let (_, request) =
            HandshakeInitiator::new(&mut w.rng, &w.secondary, &w.bloc, &init(Purpose::Join, b""));
        assert_eq!(
            open_request(&w.keyring, &w.bloc, &request).unwrap().cookie,
            None
        );
    }

    #[test]
    fn a_cookie_reply_is_smaller_than_the_request_and_answers_only_it() {
        let mut w = world();
        let (state, request) = w.initiate(Purpose::Join, b"");
        let (other, _) = w.initiate(Purpose::Join, b"");
        let r = open_request(&w.keyring, &w.bloc, &request).unwrap();
        let reply = r.cookie_reply(&[9; COOKIE_BYTES], origin(2), &mut w.rng);
        assert_eq!(reply.len(), COOKIE_REPLY_BYTES);
        assert!(reply.len() < request.len());
        let (header, cookie) = state.finish_cookie(&reply).unwrap();
        assert_eq!(cookie, [9; COOKIE_BYTES]);
        assert_eq!(header.sender, NodeId(2));
        assert_eq!(
            other.finish_cookie(&reply).unwrap_err(),
            HandshakeError::Open(OpenError::AuthFailed)
        );
        assert!(state.finish(&reply).is_err(), "not a join reply");
        let mut bad = reply.clone();
        bad[70] ^= 1;
        assert!(state.finish_cookie(&bad).is_err());
        // And opening a request does no x25519 work: answering it does.
        let keys = w.transient.join_keys(NOW).unwrap();
        let answer = r.answer(Some(&keys), origin(2), b"", &mut w.rng).unwrap();
        assert_eq!(answer.len(), REPLY_BYTES);
        assert_eq!(state.finish(&answer).unwrap().keys.current.epoch, 77);
    }

    #[test]
    fn roundtrip_hands_over_the_current_transient_key() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        assert_eq!(request.len(), REQUEST_BYTES);
        assert_eq!(resp.reply.len(), REPLY_BYTES);
        assert!(resp.reply.len() <= request.len());
        assert_eq!(resp.purpose, Purpose::Join);
        assert_eq!(resp.request.sender, NodeId(1));
        assert_eq!(resp.request.kind, Kind::Handshake);
        assert_eq!(resp.request.key_id, key_id(&w.secondary, &w.bloc));
        let Joined {
            header,
            keys,
            context,
        } = state.finish(&resp.reply).unwrap();
        assert!(context.is_empty());
        assert_eq!(header.sender, NodeId(2));
        assert_eq!(header.boot, BootId(102));
        assert_eq!(keys.current.epoch, 77);
        assert_eq!(
            keys.current.key.as_bytes(),
            &w.transient.key_bytes(77).unwrap()
        );
        assert_eq!(keys.previous, None);
        let ann = keys;
        // A second reply (another responder) also completes the same state.
        let resp2 = respond(
            &w.keyring,
            &w.bloc,
            &request,
            &w.transient,
            NOW,
            origin(3),
            b"",
            &mut w.rng,
        )
        .unwrap();
        assert_eq!(state.finish(&resp2.reply).unwrap().keys, ann);
    }

    #[test]
    fn key_request_uses_the_same_exchange() {
        let mut w = world();
        let (state, request) = w.initiate(Purpose::KeyRequest, b"");
        let resp = w.respond(&request).unwrap();
        assert_eq!(resp.purpose, Purpose::KeyRequest);
        assert_eq!(state.finish(&resp.reply).unwrap().keys.current.epoch, 77);
    }

    #[test]
    fn every_installed_secondary_key_admits_a_joiner() {
        let mut w = world();
        let other = SecretKey::generate(&mut w.rng);
        w.keyring.install(other.clone()).unwrap();
        let (state, request) =
            HandshakeInitiator::new(&mut w.rng, &other, &w.bloc, &init(Purpose::Join, b""));
        let resp = w.respond(&request).unwrap();
        assert_eq!(resp.request.key_id, key_id(&other, &w.bloc));
        assert_eq!(state.finish(&resp.reply).unwrap().keys.current.epoch, 77);
    }

    #[test]
    fn wrong_secondary_key_fails() {
        let mut w = world();
        let wrong = SecretKey::generate(&mut w.rng);
        let (_, request) =
            HandshakeInitiator::new(&mut w.rng, &wrong, &w.bloc, &init(Purpose::Join, b""));
        let err = w.respond(&request).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::Open(OpenError::UnknownKey(key_id(&wrong, &w.bloc)))
        );
        assert_eq!(err.drop_reason(), DropReason::UnknownKey);
        // Forge the right key id onto a request sealed under the wrong key: one attempt, fails.
        let mut forged = request.clone();
        forged[8..12].copy_from_slice(&key_id(&w.secondary, &w.bloc).to_le_bytes());
        let err = w.respond(&forged).unwrap_err();
        assert_eq!(err.drop_reason(), DropReason::AuthFailed);
        // And the initiator rejects a reply sealed under another secondary key.
        let (state, _) =
            HandshakeInitiator::new(&mut w.rng, &wrong, &w.bloc, &init(Purpose::Join, b""));
        let (_, _, resp) = exchange(&mut w);
        assert_eq!(
            state.finish(&resp.reply).unwrap_err(),
            HandshakeError::Open(OpenError::UnknownKey(key_id(&w.secondary, &w.bloc)))
        );
    }

    #[test]
    fn wrong_bloc_fails() {
        let mut w = world();
        let other = Bloc::new("bloc-b");
        // Same secondary key, other bloc: the tag differs, so it is dropped before crypto.
        let (_, request) =
            HandshakeInitiator::new(&mut w.rng, &w.secondary, &other, &init(Purpose::Join, b""));
        let err = w.respond(&request).unwrap_err();
        assert_eq!(err, HandshakeError::Open(OpenError::WrongBloc(other.tag())));
        // With the tag and key id forged to ours, the derived keys still differ.
        let mut forged = request.clone();
        forged[4..8].copy_from_slice(&w.bloc.tag().to_le_bytes());
        forged[8..12].copy_from_slice(&key_id(&w.secondary, &w.bloc).to_le_bytes());
        let err = w.respond(&forged).unwrap_err();
        assert_eq!(err.drop_reason(), DropReason::AuthFailed);
    }

    #[test]
    fn tampered_bytes_fail() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        for i in 0..request.len() {
            let mut bad = request.clone();
            bad[i] ^= 0x40;
            let r = w.respond(&bad);
            assert!(r.is_err(), "request byte {i}");
        }
        for i in 0..resp.reply.len() {
            let mut bad = resp.reply.clone();
            bad[i] ^= 0x40;
            assert!(state.finish(&bad).is_err(), "reply byte {i}");
        }
        assert!(w.respond(&request[..200]).is_err());
        let mut long = request.clone();
        long.push(0);
        let err = w.respond(&long);
        assert_eq!(err.unwrap_err().drop_reason(), DropReason::Oversized);
        assert_eq!(
            state.finish(&request).unwrap_err().drop_reason(),
            DropReason::Oversized
        );
        assert_eq!(
            state.finish(&resp.reply[..100]).unwrap_err().drop_reason(),
            DropReason::Truncated
        );
    }

    #[test]
    fn during_a_switch_the_reply_carries_both_keys() {
        let mut w = world();
        // The leader (node 2) made its next key: announced, not sealed with yet.
        let new = w
            .transient
            .make_key(NOW + Duration::from_secs(30), NodeId(2), &mut w.rng)
            .unwrap();
        let later = NOW + Duration::from_secs(31);
        let (state, request) = w.initiate(Purpose::Join, b"");
        let resp = w.respond_at(&request, later, b"").unwrap();
        assert!(resp.reply.len() <= request.len());
        let keys = state.finish(&resp.reply).unwrap().keys;
        assert_eq!(keys.current.epoch, 77);
        assert_eq!(keys.previous.as_ref().map(|p| p.epoch), Some(new));
        // The joiner installs both, as the core does, and seals like everyone else.
        let mut joiner = TransientKeys::new(w.bloc.clone(), ROTATION_MAX);
        for k in keys.previous.iter().chain([&keys.current]) {
            assert!(joiner.install(k.epoch, k.key.clone(), NodeId(2), later, false));
        }
        joiner.set_own(keys.current.epoch);
        assert_eq!(joiner.sealing_key(None, later).unwrap().0, 77);
        assert!(joiner.key_for(new, later).is_ok());
    }

    #[test]
    fn contexts_travel_both_ways() {
        let mut w = world();
        let long = [7u8; MAX_CONTEXT_BYTES];
        let (state, request) = w.initiate(Purpose::KeyRequest, b"claim of the initiator");
        let resp = w.respond_at(&request, NOW, &long).unwrap();
        assert_eq!(resp.context, b"claim of the initiator");
        assert_eq!(resp.reply.len(), REPLY_BYTES);
        let joined = state.finish(&resp.reply).unwrap();
        assert_eq!(joined.context, long);
        assert_eq!(joined.keys.current.epoch, 77);
    }

    #[test]
    #[should_panic(expected = "handshake context is 65 bytes")]
    fn an_oversized_context_is_a_programming_error() {
        let mut w = world();
        let ctx = [0u8; MAX_CONTEXT_BYTES + 1];
        let _ = w.initiate(Purpose::Join, &ctx);
    }

    #[test]
    fn a_bad_context_length_is_malformed() {
        let mut w = world();
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        let public = PublicKey::from(&StaticSecret::random_from_rng(&mut w.rng));
        for (len, trailing) in [(65u8, false), (3, true)] {
            let mut body = [0u8; REQUEST_BODY_BYTES];
            body[0] = TYPE_REQUEST;
            body[2..34].copy_from_slice(public.as_bytes());
            body[REQUEST_CONTEXT_AT] = len;
            if trailing {
                body[REQUEST_BODY_BYTES - 1] = 1;
            }
            let mut d = Vec::new();
            seal(&packet, &h, &body, &mut w.rng, &mut d);
            let err = w.respond(&d);
            assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
        }
    }

    #[test]
    fn reply_to_another_request_does_not_open() {
        let mut w = world();
        let (state_a, _, _) = exchange(&mut w);
        let (_, _, resp_b) = exchange(&mut w);
        assert_eq!(
            state_a.finish(&resp_b.reply).unwrap_err(),
            HandshakeError::Open(OpenError::AuthFailed)
        );
    }

    #[test]
    fn responder_without_a_fresh_key_does_not_answer() {
        let mut w = world();
        let (_, request) = w.initiate(Purpose::Join, b"");
        let empty = TransientKeys::new(w.bloc.clone(), ROTATION_MAX);
        let err = respond(
            &w.keyring,
            &w.bloc,
            &request,
            &empty,
            NOW,
            origin(2),
            b"",
            &mut w.rng,
        );
        assert_eq!(err.unwrap_err(), HandshakeError::NoTransientKey);
        let late = NOW + Duration::from_secs(91);
        let err = w.respond_at(&request, late, b"");
        assert_eq!(err.unwrap_err().drop_reason(), DropReason::Unexpected);
    }

    #[test]
    fn a_flock_datagram_is_not_a_handshake() {
        let mut w = world();
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let mut h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        h.kind = Kind::Flock;
        let mut d = Vec::new();
        seal(&packet, &h, &[0; REQUEST_BODY_BYTES], &mut w.rng, &mut d);
        let err = w.respond(&d);
        assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
    }

    /// Forward secrecy: with the secondary key, an eavesdropper opens both outer layers and
    /// learns E_i and E_r, but the key that seals the transient key needs X25519(e_i, E_r).
    #[test]
    fn a_recorded_exchange_cannot_be_opened_with_only_the_secondary_key() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let (mut req_body, mut rep_body) = (Vec::new(), Vec::new());
        open(&packet, &request, &mut req_body).unwrap();
        open(&packet, &resp.reply, &mut rep_body).unwrap();
        let e_i: [u8; 32] = req_body[2..34].try_into().unwrap();
        let e_r: [u8; 32] = rep_body[1..33].try_into().unwrap();
        let transient = SecretKey::from_bytes(w.transient.key_bytes(77).unwrap());
        assert!(
            !rep_body.windows(4).any(|win| win == 77u32.to_le_bytes()),
            "epoch is sealed too"
        );
        // The transient key is nowhere in clear in the opened layers.
        assert!(!rep_body.windows(32).any(|win| win == transient.as_bytes()));
        let transcript = transcript_end(transcript_start(&request), &resp.reply[..36], &e_r);
        let sealed = &rep_body[33..];
        let try_open = |shared: &[u8; 32]| {
            let key = reply_key(&w.bloc, &w.secondary, shared, &transcript);
            let mut plain = sealed[..INNER_BYTES].to_vec();
            key.cipher
                .decrypt_in_place_detached(
                    &XNonce::default(),
                    &transcript,
                    &mut plain,
                    Tag::from_slice(&sealed[INNER_BYTES..]),
                )
                .is_ok()
        };
        // Everything the eavesdropper can compute from public values fails.
        assert!(!try_open(&[0; 32]));
        assert!(!try_open(&e_i));
        assert!(!try_open(&e_r));
        let mut attacker = ChaCha20Rng::seed_from_u64(999);
        let guess = StaticSecret::random_from_rng(&mut attacker);
        assert!(!try_open(
            guess.diffie_hellman(&PublicKey::from(e_r)).as_bytes()
        ));
        assert!(!try_open(
            guess.diffie_hellman(&PublicKey::from(e_i)).as_bytes()
        ));
        // Only the shared secret of the ephemeral keys opens it.
        let shared = state.ephemeral.diffie_hellman(&PublicKey::from(e_r));
        assert!(try_open(shared.as_bytes()));
        // And the derived key depends on the ephemeral secret: another e_i, another key.
        let other = StaticSecret::random_from_rng(&mut attacker);
        let k1 = w.bloc.derive(
            &[w.secondary.as_bytes(), shared.as_bytes(), &transcript],
            label::JOIN_REPLY,
        );
        let k2 = w.bloc.derive(
            &[
                w.secondary.as_bytes(),
                other.diffie_hellman(&PublicKey::from(e_r)).as_bytes(),
                &transcript,
            ],
            label::JOIN_REPLY,
        );
        assert_ne!(k1, k2);
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let mut w = world();
        // A request whose ephemeral key is the identity point (all zero): no contribution.
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        let mut body = [0u8; REQUEST_BODY_BYTES];
        body[0] = TYPE_REQUEST;
        let mut d = Vec::new();
        seal(&packet, &h, &body, &mut w.rng, &mut d);
        let err = w.respond(&d);
        assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
        // A reply with a zero responder key is refused by the initiator.
        let (state, _) = w.initiate(Purpose::Join, b"");
        let mut rbody = [0u8; REPLY_BODY_BYTES];
        rbody[0] = TYPE_REPLY;
        let mut r = Vec::new();
        seal(&packet, &h, &rbody, &mut w.rng, &mut r);
        assert_eq!(
            state.finish(&r).unwrap_err(),
            HandshakeError::Open(OpenError::AuthFailed)
        );
    }

    #[test]
    fn deterministic_given_the_rng() {
        let run = || {
            let mut w = world();
            let (_, request, resp) = exchange(&mut w);
            (request, resp.reply)
        };
        assert_eq!(run(), run());
    }
}
