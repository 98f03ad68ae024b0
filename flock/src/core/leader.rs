//! Leadership: the sticky leader with terms, its gossiped beat, and the election (the best-ranked
//! live member claims when there is no live leader and the membership has been quiet).

use std::time::Duration;

use crux_proto::flock::LeaderClaim;

/// How often the election and leader-liveness checks run, as a fraction of `settle`.
const ELECTION_TICKS_PER_SETTLE: u32 = 4;

/// The leadership state.
pub(super) struct Leadership {
    /// The claim of the leader this node follows (its own, if it leads).
    pub(super) claim: Option<LeaderClaim>,
    /// When the leader last showed it is alive (a newer beat, an ack to a leader check).
    pub(super) last_beat: Duration,
    /// The highest term seen.
    pub(super) max_term: u64,
    /// When the live membership last changed (an election waits for it to settle).
    pub(super) last_change: Duration,
    /// This node's rank among the live members, as of `last_change`.
    pub(super) rank_cache: Option<(Duration, usize)>,
}

impl Leadership {
    /// No leader known at `now`.
    pub(super) fn new(now: Duration) -> Leadership {
        Leadership {
            claim: None,
            last_beat: now,
            max_term: 0,
            last_change: now,
            rank_cache: None,
        }
    }
}

/// The period of the election check.
pub(super) fn election_tick(t: &crate::config::Timing) -> Duration {
    (t.settle / ELECTION_TICKS_PER_SETTLE).max(Duration::from_millis(10))
}
