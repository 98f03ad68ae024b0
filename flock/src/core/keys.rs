//! Keys, as the state machine uses them: the security state ([`Sec`]), when to ask for keys
//! (a rotation missed, a member we cannot read), which key each peer seals with, the leader's
//! rotations and the keyring changes spread by the flock.

use std::net::SocketAddr;
use std::time::Duration;

use super::secure::Sec;
use super::FastMap;

/// Unanswered key requests after which a node says it is shut out (and every as many after).
pub(super) const SHUT_OUT_REQUESTS: u32 = 10;

/// The key state of the state machine.
#[derive(Default)]
pub(super) struct Keys {
    /// Security state (None: plain datagrams, for tests of the protocol alone).
    pub(super) sec: Option<Sec>,
    /// A member sealed under a key we do not hold (ask for keys at the next check).
    pub(super) hint: bool,
    /// Key requests sent since a handshake of ours was last answered.
    pub(super) unanswered_requests: u32,
    /// Members we could not read lately, and when we last asked them for their keys.
    pub(super) unreadable: FastMap<SocketAddr, Duration>,
    /// Key epoch each peer address ([`addr_key`](super::table::addr_key)) last sealed with.
    pub(super) peer_epoch: FastMap<u64, u32>,
}
