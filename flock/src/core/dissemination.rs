//! Dissemination: the piggyback queue of updates, gossip rounds, push-pull (full-state
//! anti-entropy, over a stream when it outgrows a datagram) and the membership digests that
//! trigger an early push-pull when views differ.
//!
//! News spreads three ways, cheapest first: piggybacked on probes and acks, in gossip datagrams
//! to a few random members, and by periodic push-pull, whose period scales with N so that the
//! full-state bytes per node stay flat, and that stays fast while two views still differ.

use std::time::Duration;

use crux_proto::flock::NodeId;

use super::broadcast::Broadcasts;
use super::FastMap;

/// Push-pull stays fast for this many fast intervals after an exchange that taught us members.
pub(super) const FAST_PUSH_PULL_ROUNDS: u32 = 4;
/// A push-pull whose two views differ by at least this many members keeps push-pull fast.
pub(super) const FAST_PUSH_PULL_DIFF: usize = 2;

/// The dissemination state.
#[derive(Default)]
pub(super) struct Dissemination {
    /// Updates waiting to be piggybacked or gossiped.
    pub(super) broadcasts: Broadcasts,
    /// Push-pull runs at the fast interval until then.
    pub(super) fast_push_pull_until: Duration,
    /// Since when the digests peers show us differ from ours.
    pub(super) digest_mismatch_since: Option<Duration>,
    /// When a digest mismatch last made us push-pull.
    pub(super) last_digest_push_pull: Option<Duration>,
    /// Last time we push-pulled with a member because it spoke to us while we held it dead.
    pub(super) last_heal: FastMap<NodeId, Duration>,
}
