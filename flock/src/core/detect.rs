//! Failure detection: SWIM probes (direct, indirect through relays, and over a stream),
//! suspicion with Lifeguard's confirmations and timeouts, refutation, and local health
//! (awareness).
//!
//! Each probe round walks a fresh shuffle of the live members. A probe that gets no ack within
//! the probe timeout goes to `indirect_probes` relays and, as memberlist's TCP ping, over a
//! stream; if nothing answers by the end of the probe interval, the target becomes suspect.
//! Suspicions time out into death after [`suspicion_timeout`], which independent confirmations
//! shorten. A node told it is suspect (or dead) refutes with a higher incarnation.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::NodeId;

use super::FastMap;
use crate::config::Config;

/// Most indirect probes this node relays at once (bounds work a peer can ask of us).
pub(super) const RELAYS_MAX: usize = 1024;
/// Most distinct suspecters remembered per suspicion.
pub(super) const CONFIRMATIONS_MAX: usize = 64;

/// A suspicion running, by suspect.
pub(super) struct Suspicion {
    /// Token of the suspicion when it started (confirmations change `token`, not this).
    pub(super) started_token: u64,
    pub(super) started: Duration,
    pub(super) confirmations: Vec<NodeId>,
    pub(super) token: u64,
}

/// A probe of ours waiting for its ack.
pub(super) struct Probe {
    pub(super) target: NodeId,
    pub(super) sent: Duration,
    pub(super) nacks_expected: u32,
    pub(super) nacks: u32,
    /// Probe of the leader started because its beats stopped arriving.
    pub(super) leader_check: bool,
}

/// An indirect probe this node relays for `requester` (whose sequence number is `seq`).
pub(super) struct Relay {
    pub(super) requester: SocketAddr,
    pub(super) seq: u32,
}

/// The failure detector's state.
#[derive(Default)]
pub(super) struct Detection {
    /// This round's shuffle of the live members, and the next one to probe.
    pub(super) probe_order: Vec<NodeId>,
    pub(super) probe_next: usize,
    /// Our probes waiting for an ack, by sequence number.
    pub(super) probes: FastMap<u32, Probe>,
    /// Indirect probes we relay, by our sequence number.
    pub(super) relays: FastMap<u32, Relay>,
    /// Last sequence number used (pings, probes, relays).
    pub(super) seq: u32,
    /// Suspicions running, by suspect.
    pub(super) suspicions: FastMap<NodeId, Suspicion>,
    /// Last suspicion token handed out.
    pub(super) suspicion_token: u64,
    /// Lifeguard local-health score (0 = healthy): scales probe intervals and timeouts.
    pub(super) awareness: u32,
    /// We refuted a suspicion of us while handling this input: answer its sender directly.
    pub(super) refute_pending: bool,
}

/// Lifeguard's suspicion timeout after `confirmations` independent confirmations beyond the first
/// suspicion: `max(min, max − (max − min) · log(c + 1) / log(k + 1))`.
pub(crate) fn suspicion_timeout(
    config: &Config,
    live_n: usize,
    is_leader: bool,
    confirmations: usize,
) -> Duration {
    let t = &config.timing;
    let (min, k) = if is_leader {
        (t.leader_suspicion_min, t.leader_confirmations as usize)
    } else {
        let n = (live_n as f64).max(1.0);
        let scale = n.log10().max(1.0);
        let k = (t.suspicion_mult as usize).saturating_sub(2);
        let k = if live_n < k + 2 { 0 } else { k };
        (t.probe_interval.mul_f64(t.suspicion_mult as f64 * scale), k)
    };
    let max = min * t.suspicion_max_mult;
    if k == 0 {
        return min;
    }
    let frac = ((confirmations as f64) + 1.0).ln() / ((k as f64) + 1.0).ln();
    let timeout = max.as_secs_f64() - (max - min).as_secs_f64() * frac;
    Duration::from_secs_f64(timeout.max(min.as_secs_f64()))
}
