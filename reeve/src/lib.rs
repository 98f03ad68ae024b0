//! Reeve: the per-node registry agent, and the library services use to reach it.
//!
//! * [`node`]: local registrations and their heartbeats (the heartbeater), the node's full
//!   replica of the steward's table, and the registry calls of the local API answered from it
//!   ([`Reeve::register`], [`Reeve::heartbeat`], [`Reeve::lookup`], [`Reeve::watch`]); the agent
//!   serves them on its Unix socket. It is also pastiche's tracker client: which blobs this node
//!   holds ([`Reeve::hold`]) and who holds a blob ([`Reeve::holders`]).
//! * [`link`]: the one batched stream from this node to the steward, over the node plane: every
//!   local instance first, then registrations, removals and beats; the steward's table changes
//!   come back down it into the replica.
//! * [`client`]: the library services use: register and keep heartbeating, and
//!   [`client::connect`], a channel that follows the best instance of a selector.
//! * [`kv`]: Blueprint K/V through the agent: reads, compare-and-swap writes, transactions, and
//!   a watch that resumes from its last index after a lost connection.
//! * [`endpoint`]: sealed service endpoints: a service serves TLS 1.3 with its own key and
//!   registers the public half; a [`endpoint::Dialer`] connects only to the key registered.
//!
//! **Never.** Lookups and watches read the replica and never leave the node, so they keep
//! answering while no steward is reachable. A node sends the steward one stream, never one per
//! service. Local instances are authoritative here: what the steward says never overrides this
//! node's own view of them. Every node-to-node call goes through the [`crux_transport::Transport`]
//! handle in [`ReeveConfig`]; no key or connection is process-global.

pub mod client;
pub mod endpoint;
pub mod kv;
pub mod link;
pub mod node;
pub mod route;

pub use node::{HeartbeatStream, LinkStatus, Reeve, ReeveConfig, Target, WatchStream};
