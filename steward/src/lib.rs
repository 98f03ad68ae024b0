//! Steward: the flock-wide service registry that runs on the leader.
//!
//! * [`select`]: selectors (an api, best live instance first, or an exact instance) and the
//!   natural order of instance names.
//! * [`table`]: a table whose changes are numbered by revision and logged, so that watchers
//!   resume; both the steward and every reeve's replica use it.
//! * [`registry`]: what a reeve's batch does, validity and expiry.
//! * [`server`]: the node gRPC service (`Link`, `Table`), called only over the node plane.

pub mod registry;
pub mod select;
pub mod server;
pub mod table;

pub use registry::Registry;
pub use select::{natural_cmp, Selector};
pub use server::{Steward, StewardConfig, StewardService};
pub use table::{Change, Table};
