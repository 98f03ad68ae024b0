//! The envelope seam: sealing what the state machine sends and opening what it receives (plain
//! headers with security off, [`Sec`](super::secure::Sec) with it on), the datagram budget, and
//! the rule that an answer to a possibly forged source is never larger than what came from it.

use std::net::SocketAddr;

use crux_proto::flock::NodeId;

/// Bytes reserved in every datagram for the security envelope (nonce + tag).
pub(crate) const ENVELOPE_OVERHEAD: usize = 24 + 16;

/// The envelope state.
pub(super) struct Wire {
    /// The bloc's tag, in every header.
    pub(super) bloc_tag: u32,
    /// The counter of the last datagram or frame sealed (per boot; replay windows key on it).
    pub(super) counter: u64,
    /// While a datagram is handled: its source, its length and its sender. An answer to a source
    /// that is not the sender's own address in the table (forged, or a node not in the table) is
    /// never larger than that datagram: it piggybacks only what fits, a push-pull answer that
    /// does not fit goes over a stream (TCP), anything else that does not fit is not sent. No
    /// amplification towards an address that may not have sent it (DESIGN.md "Node plane").
    pub(super) reply_cap: Option<(SocketAddr, usize, NodeId)>,
}
