//! Packet envelope, replay window, join handshake, transient keys and the secondary keyring.
//!
//! Everything here is a pure function or a plain data structure: time comes in as a `now:
//! Duration`, randomness from the caller's seeded CSPRNG (`&mut (impl RngCore + CryptoRng)`), and
//! nothing reads a clock, a socket or the OS RNG. The flock core calls it; the agent seeds the
//! core's RNG from the OS.
//!
//! # Packet format
//!
//! ```text
//! offset  bytes  field
//!      0      2  magic "CX"                                   ┐
//!      2      1  version (1)                                  │
//!      3      1  kind (0 flock, 1 handshake)                  │
//!      4      4  bloc tag                                     │  header: in clear,
//!      8      4  key id: transient epoch, or secondary key id │  authenticated as
//!     12      8  sender node id                               │  associated data
//!     20      8  sender boot id                               │
//!     28      8  counter (per sender and boot)                ┘
//!     36     24  XChaCha20 nonce (random)
//!     60      m  ciphertext of the m-byte body
//!   60+m     16  Poly1305 tag
//! ```
//! (integers little endian)
//!
//! The header is [`crux_proto::flock::Header`]. The body is sealed with XChaCha20-Poly1305 under a
//! random 192-bit nonce ([`seal`]); [`OVERHEAD`] (nonce + tag) is 40 bytes. All 36 header bytes are
//! the associated data: magic, version, kind, bloc tag, key id, sender, boot and counter are all
//! authenticated, and the body is authenticated and encrypted. Stream frames use the same format
//! (up to [`MAX_SEALED_FRAME_BYTES`]). The flock core seals every flock datagram and frame for its
//! recipient ([`seal_for`], [`open_for`]): the recipient's node id is appended to the associated
//! data (not sent), so a datagram recorded on its way to one member does not open at another.
//!
//! Receiving is, in order, each step cheaper than the next and none changing state until the
//! datagram authenticated:
//!
//! 1. size (`len ≤ MTU`, or the frame limit) — before anything else ([`check`]);
//! 2. header parse and bloc tag ([`check`]): other blocs are dropped before any crypto;
//! 3. key selection by `key_id`: the transient epoch ([`TransientKeys::key_for`]) or the secondary
//!    key id ([`Keyring::by_key_id`]) — exactly one key, so exactly one decryption attempt;
//! 4. optionally a replay pre-check ([`ReplayTable::check`]), then [`open`] ([`open_for`] in the
//!    core);
//! 5. the replay window ([`ReplayTable::accept`]), only now that the header is authentic; for a
//!    join request ([`open_request`], no x25519 yet), first its destination and its timestamp
//!    ([`InitiationStamps`]), then the per-source rate limit ([`RateLimiter`]) and the load
//!    ([`HandshakeLoad`]: a cookie reply instead of an answer), see [`handshake`];
//! 6. body decoding ([`decode_drop_reason`] for its errors).
//!
//! [`receive()`] does steps 1 to 5 for flock datagrams and frames (sealed with [`seal_for`]);
//! the flock core runs it on everything sealed under a transient key, and opens handshake
//! datagrams itself. The flock core holds one node's whole state (keyring, the transient keys of
//! its flock, replay table, rate limiter, counter, pending handshake, rotation schedule) and
//! does all of it for each datagram given to
//! [`Flock::handle_datagram`](crate::Flock::handle_datagram), counting every drop by reason in
//! [`Flock::stats`](crate::Flock::stats). [`hostile::HostileTraffic`] makes deterministic hostile
//! input for tests and benchmarks of this path.
//!
//! Every failure maps to a [`DropReason`](crate::DropReason) ([`OpenError::drop_reason`],
//! [`HandshakeError::drop_reason`]): the datagram is dropped, counted, and never answered.
//!
//! # Key hierarchy
//!
//! ```text
//! bloc ID ──SHA-256──▶ bloc salt (HKDF salt of every derivation below)   bloc tag = FNV-1a(bloc ID)
//!
//! secondary key (keyring, long-lived, operator-managed)
//!   ├─ HKDF(salt, key, "key-id")[..4]      → key id in handshake headers
//!   ├─ HKDF(salt, key, "handshake")        → handshake packet key (JoinRequest / JoinReply)
//!   └─ HKDF(salt, key ‖ X25519(e_i, e_r) ‖ transcript, "join-reply")
//!                                           → seals the transient key inside a JoinReply
//!
//! transient key (one per epoch, random, made by the leader every 30–60 s)
//!   └─ HKDF(salt, key, "transient-packet") → packet key of every flock datagram; key id = epoch
//! ```
//!
//! * [`SecretKey`]: 32 bytes, wiped on drop, constant-time `==`, base64 text form, no bytes in
//!   `Debug`. [`PacketKey`]: a derived AEAD key; raw keys never seal anything directly.
//! * [`Bloc`]: every derived key mixes in the bloc ID, so two blocs that share a secondary key (or
//!   whose tags collide) still cannot read each other.
//! * [`TransientKeys`]: the one key schedule. A node holds at most [`TRANSIENT_KEYS_MAX`] keys
//!   (its flock's current and previous, and a merging flock's), each tagged with the leader that
//!   made it and accepted for 1.5 × the longest rotation period after it was installed. The
//!   leader makes a key under a random epoch ([`TransientKeys::make_key`]) every 30–60 s
//!   ([`ROTATION_MIN`], [`ROTATION_MAX`]) and spreads it by gossip sealed under the current key;
//!   make before break: it seals with the new key (and names it in its claim) only a third of the
//!   shortest period later, and members switch as the claim names it
//!   ([`TransientKeys::follow_claim`]). A member that holds no fresh key
//!   ([`TransientKeys::needs_key`]) asks again through the handshake ([`Purpose::KeyRequest`]),
//!   whose reply carries [`TransientKeys::join_keys`] ([`JoinKeys`]: two [`KeyAnnouncement`]s
//!   of 36 fixed bytes).
//! * [`Keyring`]: Serf-style install / use / remove / list; the primary key starts this node's
//!   handshakes, every installed key admits a joiner. Stored as a text file, mode 0600, written
//!   atomically. Changes spread as [`KeyringOp`]s (33 fixed bytes) under the transient key.
//! * Handshake ([`HandshakeInitiator`], [`open_request`], [`respond`]): see [`handshake`] for the
//!   exchange, its timestamps, destinations and cookies. No reply is larger than the request
//!   ([`REPLY_BYTES`] ≤ [`REQUEST_BYTES`], [`COOKIE_REPLY_BYTES`] < [`REQUEST_BYTES`]).
//!
//! # Threat model (DESIGN.md, "Keys and packets")
//!
//! * Outsiders without a key can read, forge or replay nothing: every body is encrypted and every
//!   header authenticated; replays are caught by the per-(sender, boot) window of 8,128 counters
//!   ([`ReplayWindow`], as WireGuard), a datagram recorded on its way to another node does not
//!   open (sealed for its recipient), and a join request is taken only at the address it names
//!   and only if newer than the last one of its sender ([`InitiationStamps`]); unauthenticated
//!   input gets no reply and changes no state, and every table an outsider could touch is bounded
//!   ([`RateLimiter`] by entries; [`ReplayTable`] and [`InitiationStamps`] grow only on
//!   authenticated datagrams, and are bounded too).
//! * Handshakes are rate-limited per source address (20/s, burst 5, as WireGuard), answered with
//!   a cookie instead of x25519 work under load (over 100/s), and no reply is larger than its
//!   request: a forged source gains no amplification.
//! * Holders of a secondary key are members (the Serf model): they can join, learn the transient
//!   key and speak for any node id. Per-node signatures come later.
//! * Forward secrecy of the transient keys against a later leak of the secondary key: the
//!   transient key travels in a JoinReply under a key that needs an ephemeral x25519 secret, and
//!   in announcements under the previous transient key; both are wiped. (An attacker who holds a
//!   secondary key *while* recording can run its own handshake — that is the member model above.)
//! * Not protected: the header is in clear (who talks to whom, node ids, sizes); a key holder's
//!   denial of service; traffic analysis. No post-compromise security for transient keys: whoever
//!   obtains one transient key can open the announcements sealed under it, and so follow the
//!   rotations that come after, until it misses one.

pub mod cookie;
pub mod envelope;
pub mod handshake;
pub mod hostile;
pub mod keyring;
pub mod keys;
pub mod ratelimit;
pub mod receive;
pub mod replay;
pub mod transient;

pub use cookie::{
    Cookie, CookieSecrets, HandshakeLoad, COOKIE_BYTES, COOKIE_REUSE_MAX, COOKIE_SECRET_MAX_AGE,
    HANDSHAKES_UNDER_LOAD,
};
pub use envelope::{
    check, decode_drop_reason, max_plaintext, open, open_datagram, open_for, seal, seal_for,
    sealed_len, OpenError, MAX_SEALED_FRAME_BYTES, MIN_SEALED_BYTES, NONCE_BYTES, OVERHEAD,
    TAG_BYTES,
};
pub use handshake::{
    open_request, respond, respond_with, HandshakeError, HandshakeInitiator, Initiation, Joined,
    Origin, Purpose, Request, Response, Tai64N, COOKIE_REPLY_BYTES, MAX_CONTEXT_BYTES, REPLY_BYTES,
    REQUEST_BYTES,
};
pub use keyring::{
    Keyring, KeyringError, KeyringOp, KEYRING_FILE_MODE, KEYRING_OP_BYTES, MAX_KEYS,
};
pub use keys::{key_id, node_auth_key, Bloc, KeyParseError, PacketKey, SecretKey, KEY_BYTES};
pub use ratelimit::{RateLimiter, HANDSHAKES_PER_SECOND, HANDSHAKE_BURST};
pub use receive::receive;
pub use replay::{InitiationStamps, ReplayTable, ReplayWindow, REPLAY_WINDOW};
pub use transient::{
    JoinKeys, KeyAnnouncement, TransientKeys, ANNOUNCEMENT_BYTES, ROTATION_MAX, ROTATION_MIN,
    TRANSIENT_KEYS_MAX,
};
