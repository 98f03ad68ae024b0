//! The flock protocol: how Crux nodes find each other, agree on membership and elect one leader.
//!
//! The protocol is a pure state machine, [`Flock`]: time, datagrams, stream frames and commands go
//! in; datagrams, stream requests, events and the next deadline come out. It never reads a clock,
//! opens a socket or draws from an unseeded RNG, so the tokio driver (`driver`, feature `driver`)
//! and the deterministic simulator ([`sim`]) drive the very same code.
//!
//! ```text
//!            handle_datagram / handle_stream / handle_timeout / handle_command
//!   driver ───────────────────────────────────────────────────────────────────▶ Flock
//!          ◀─────────────────────────────────────────────────────────────────── (core)
//!            poll_transmit / poll_event / poll_timeout
//! ```
//!
//! Protocol summary (details in `../shared/DESIGN.md`):
//! * **Discovery**: probe random addresses of the configured [`AddressSpace`] at a bounded rate,
//!   fast while alone, plus seeds and addresses seen before. An ack from an unknown node starts a
//!   push-pull (a join).
//! * **Membership**: SWIM with Lifeguard (indirect probes, suspicion timeouts scaled by log N and
//!   shortened by independent confirmations, local health), incarnations for refutation,
//!   piggybacked gossip, periodic full-state push-pull (over a stream when larger than a datagram),
//!   graceful leave, low-rate probes of dead members, reaping.
//! * **Leader**: sticky, with terms. The leader's liveness travels as a gossiped beat counter, so
//!   the leader does O(1) work per round. With no live leader and a quiet membership, the best
//!   candidate (lowest node id among live members) claims `max term + 1`. Competing claims resolve
//!   by [`LeaderClaim::precedence`](crux_proto::flock::LeaderClaim::precedence).
//! * **Keys** ([`crypto`]): with security on (as the agent runs), every datagram is sealed with
//!   XChaCha20-Poly1305 under the leader's rotating transient key, and the bloc's secondary
//!   keyring seals only the join handshake and key requests. Each member's node-plane public key
//!   ([`NodeKey`]) rides in its sealed membership record: that is what the node plane
//!   (`crux_transport`, fed by the agent) pins connections to.
//!
//! **Never.** The core takes `now` and its seed as inputs: it never reads a clock, opens a socket,
//! spawns a task or draws from an unseeded RNG. The workspace's `clippy.toml` bans
//! `Instant::now`, `SystemTime::now` and `thread_rng`; in this crate only the tokio driver (one
//! wall-clock reading, at start) and the simulator's wall-time report are allowed them. Whatever
//! fails to authenticate or decode is dropped and counted: no reply, no panic, no state change.
//! Keys are values each [`Flock`] owns, never process-global, so the simulator runs thousands of
//! nodes in one process. The crate depends on `crux-proto` alone and knows nothing of the node
//! plane or the services above it.

pub mod config;
mod core;
pub mod crypto;
pub mod sim;

#[cfg(feature = "driver")]
pub mod driver;

pub use crate::config::{AddressSpace, Config, ConfigError, Preset, Timing};
pub use crate::core::{
    Command, DropReason, Event, Flock, FlockBuilder, Identity, LeaderView, Member, SecurityTiming,
    Stats, Transmit, TransmitKind, CLOCK_SKEW_MAX, TRANSIENT_KEYS_MAX,
};
pub use crux_proto::flock::{BootId, MemberInfo, MemberState, NodeId, NodeKey};

/// Builds a boot id that orders restarts of a node: the wall-clock start time in milliseconds in
/// the high 48 bits, random bits below. A restarted node's entry supersedes the old one because its
/// boot id is greater.
pub fn boot_id(unix_ms: u64, random: u16) -> BootId {
    BootId((unix_ms << 16) | random as u64)
}
