//! Reeve: the per-node registry agent.
//!
//! * [`node`]: local registrations and their heartbeats (the heartbeater), the node's full
//!   replica of the steward's table, and the registry calls of the local API answered from it.
//! * [`link`]: the one batched stream from this node to the steward.
//! * [`client`]: the library services use: register and keep heartbeating, and
//!   [`client::connect`], a channel that follows the best instance of a selector.

pub mod client;
pub mod endpoint;
pub mod link;
pub mod node;

pub use node::{HeartbeatStream, LinkStatus, Reeve, ReeveConfig, Target, WatchStream};
