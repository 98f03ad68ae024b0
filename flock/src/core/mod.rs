//! The flock state machine.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{BootId, MemberInfo, MemberState, NodeId, NodeKey};

mod broadcast;
mod builder;
mod detect;
mod discovery;
mod dissemination;
mod handshake;
mod idset;
mod inbound;
mod keys;
mod leader;
mod machine;
mod membership;
mod ring;
mod secure;
mod table;
#[cfg(test)]
mod tests;
mod throttle;
mod timer;
mod wire;

pub use builder::FlockBuilder;
pub use machine::Flock;
pub use secure::{SecurityTiming, CLOCK_SKEW_MAX, TRANSIENT_KEYS_MAX};

/// Who this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Node id, kept for the node's life.
    pub id: NodeId,
    /// Boot id, new at each start (see [`crate::boot_id`]).
    pub boot: BootId,
    /// The flock address other nodes reach this one at.
    pub addr: SocketAddr,
    /// The node-plane public key this node announces in its membership record (None: none,
    /// as in the simulator).
    pub key: Option<NodeKey>,
}

/// How a [`Transmit`] travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransmitKind {
    /// One UDP datagram (at most the configured MTU).
    Datagram,
    /// A stream request: the driver connects to `to`, sends the payload as one frame, reads one
    /// reply frame and hands it to [`Flock::handle_stream_reply`] (or calls
    /// [`Flock::handle_stream_failed`]). Used for push-pull larger than a datagram.
    Stream,
}

/// Bytes the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// Datagram or stream.
    pub kind: TransmitKind,
    /// The sealed bytes.
    pub payload: Vec<u8>,
}

/// Something the application may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node joined (a new id, or a new boot of a known id).
    MemberJoined(MemberInfo),
    /// A member's address or incarnation changed, or it came back from suspicion.
    MemberUpdated(MemberInfo),
    /// A member is suspected.
    MemberSuspect(MemberInfo),
    /// A member was declared dead.
    MemberDead(MemberInfo),
    /// A member left gracefully.
    MemberLeft(MemberInfo),
    /// A dead or left member was forgotten.
    MemberReaped(NodeId),
    /// The leader this node follows changed (None: no leader known).
    LeaderChanged(Option<LeaderView>),
    /// A graceful leave has been gossiped; the driver may close its socket.
    LeaveComplete,
    /// A node was revoked (here or spread by the flock): it is gone from the member table and
    /// kept out.
    MemberRevoked(NodeId),
    /// This node was revoked by the flock: it leaves, and the others ignore it from now on.
    Revoked,
    /// The secondary keyring changed (here or spread by the flock): the agent saves it.
    KeyringChanged,
    /// A keyring change was refused (the reason, e.g. removing the primary key).
    KeyringRefused(String),
}

/// Commands from the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Probe these addresses now (seeds given at run time, `crux join`).
    Join(Vec<SocketAddr>),
    /// Leave gracefully: announce it, then report [`Event::LeaveComplete`].
    Leave,
    /// Change the secondary keyring here and spread the change to every member.
    Keyring(crate::crypto::KeyringOp),
    /// Revoke a node (not this one): every member forgets it and keeps it out from now on.
    Revoke(NodeId),
}

/// The leader as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderView {
    /// Leader's node id.
    pub id: NodeId,
    /// Leader's flock address.
    pub addr: SocketAddr,
    /// Election term.
    pub term: u64,
}

/// One entry of the member table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// What the flock knows of it.
    pub info: MemberInfo,
    /// When it entered its current state (driver time).
    pub since: Duration,
}

/// Why an incoming datagram or frame was dropped. Every drop is counted by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Larger than the MTU (datagram) or the stream limit (frame).
    Oversized,
    /// Shorter than a header.
    Truncated,
    /// Not a Crux datagram, or a wire version we do not speak.
    BadMagic,
    /// Another bloc's datagram.
    WrongBloc,
    /// Header authenticated but the body does not decode.
    Malformed,
    /// Our own datagram (looped back, or another node uses our id).
    FromSelf,
    /// The key id names no key we hold.
    UnknownKey,
    /// The key id names an epoch older than we accept.
    StaleKey,
    /// Failed to authenticate.
    AuthFailed,
    /// Already seen (replay window).
    Replay,
    /// A join request not newer than the last one taken from its sender (a replay, or an older
    /// request), or stamped before this node started.
    OldInitiation,
    /// A join request addressed to another address than this node's (recorded on its way to
    /// another node, or to an address where no node listens).
    Misdirected,
    /// A join request without a valid cookie while this node was under load: answered with a
    /// cookie instead of keys.
    UnderLoad,
    /// Handshake over the per-source rate limit.
    RateLimited,
    /// Valid but not acceptable now (e.g. an ack nobody waits for, a message while leaving).
    Unexpected,
    /// The member table is full.
    TableFull,
    /// From a node the flock revoked.
    Revoked,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 17] = [
        DropReason::Oversized,
        DropReason::Truncated,
        DropReason::BadMagic,
        DropReason::WrongBloc,
        DropReason::Malformed,
        DropReason::FromSelf,
        DropReason::UnknownKey,
        DropReason::StaleKey,
        DropReason::AuthFailed,
        DropReason::Replay,
        DropReason::OldInitiation,
        DropReason::Misdirected,
        DropReason::UnderLoad,
        DropReason::RateLimited,
        DropReason::Unexpected,
        DropReason::TableFull,
        DropReason::Revoked,
    ];

    /// Snake-case name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Oversized => "oversized",
            DropReason::Truncated => "truncated",
            DropReason::BadMagic => "bad_magic",
            DropReason::WrongBloc => "wrong_bloc",
            DropReason::Malformed => "malformed",
            DropReason::FromSelf => "from_self",
            DropReason::UnknownKey => "unknown_key",
            DropReason::StaleKey => "stale_key",
            DropReason::AuthFailed => "auth_failed",
            DropReason::Replay => "replay",
            DropReason::OldInitiation => "old_initiation",
            DropReason::Misdirected => "misdirected",
            DropReason::UnderLoad => "under_load",
            DropReason::RateLimited => "rate_limited",
            DropReason::Unexpected => "unexpected",
            DropReason::TableFull => "table_full",
            DropReason::Revoked => "revoked",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed")
    }
}

/// Counters of one node (monotonic).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams received (before any check).
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes of datagrams received.
    pub bytes_in: u64,
    /// Bytes of datagrams sent.
    pub bytes_out: u64,
    /// Stream frames received (requests and replies).
    pub streams_in: u64,
    /// Stream frames sent (requests and replies).
    pub streams_out: u64,
    /// Bytes of stream frames received.
    pub stream_bytes_in: u64,
    /// Bytes of stream frames sent.
    pub stream_bytes_out: u64,
    /// Direct probes sent.
    pub probes: u64,
    /// Probes that ended in suspicion.
    pub probe_failures: u64,
    /// Push-pull exchanges started.
    pub push_pulls: u64,
    /// Times this node refuted suspicion of itself.
    pub refutations: u64,
    /// Leader claims this node made.
    pub claims: u64,
    /// Handshakes (join or key requests) this node started.
    pub handshakes_sent: u64,
    /// Handshakes this node answered.
    pub handshakes_answered: u64,
    /// Handshakes of ours that were answered (keys received).
    pub joins: u64,
    /// Join requests answered with a cookie (under load) instead of keys.
    pub cookies_sent: u64,
    /// Cookies received (our join request met a responder under load; sent again with it).
    pub cookies_received: u64,
    /// Key requests (a member that missed rotations asking again).
    pub key_requests: u64,
    /// Transient keys this node made as leader.
    pub rotations: u64,
    /// Datagrams not sent for want of a key to seal them with.
    pub unsealed: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Datagrams or frames dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }
}

/// Output queues shared by the state machine's parts.
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) transmits: VecDeque<Transmit>,
    pub(crate) events: VecDeque<Event>,
}

/// Whether a member in this state counts as part of the live flock.
pub(crate) fn is_live(state: MemberState) -> bool {
    matches!(state, MemberState::Alive | MemberState::Suspect)
}

/// A fast, deterministic hasher for the member tables (ids are random 64-bit values; datagrams
/// are authenticated before their contents reach a table). SipHash dominated simulation profiles.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(n as u64);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// HashMap with [`FastHasher`].
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;
