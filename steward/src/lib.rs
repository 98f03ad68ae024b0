//! Steward: the flock-wide service registry that runs on the leader.
//!
//! * [`select`]: selectors (an api, best live instance first, or an exact instance) and the
//!   natural order of instance names.
//! * [`table`]: a table whose changes are numbered by revision and logged, so that watchers
//!   resume; both the steward and every reeve's replica use it.
//! * [`registry`]: what a reeve's batch does, validity and expiry, and the pastiche tracker
//!   (which nodes hold which digests).
//! * [`server`]: the node gRPC service (`Link`, `Holders`, `Table`), called only over the node
//!   plane.
//!
//! ```text
//!  reeve ══ Link (one stream per node) ══▶ Steward::link ─▶ Registry::apply ─▶ Table::commit
//!    ▲                                                                             │
//!    └────────── ack, then every table change (snapshot first, resumable) ◀────────┘
//! ```
//!
//! **Never.** The steward holds soft state only: it writes nothing to disk, and a new one (one
//! per leader term, started and stopped by the agent as leadership moves) is rebuilt from its
//! node's replica and the reeves' full batches. It serves only callers the node plane proved
//! ([`server::caller`]), and a link speaks for the node that made it alone: a batch naming
//! another node is refused.

pub mod registry;
pub mod select;
pub mod server;
pub mod table;

pub use registry::Registry;
pub use select::{natural_cmp, Selector};
pub use server::{Steward, StewardConfig, StewardService};
pub use table::{Change, Table};
