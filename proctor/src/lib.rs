//! Proctor and dean logic: the intent, the placement language, placement and reconciliation.
//!
//! This crate is sans-io: no runtime, no network, no clock. The agent drives it. The proctor
//! runs on the flock leader, and a dean runs on every node.
//!
//! ```text
//!  operator ── intent TOML ──► parse_intent ──► Intent ──► store (JSON, CAS on generation)
//!                                                  │
//!  flock members + attributes ──► [Node] ──┐       ▼
//!  dean reports (Sync) ──────► [Observed] ─┴─► reconcile ──► Plan
//!                                                             ├─ assign: node → {Unit}  ──► deans
//!                                                             └─ status: per service doneness
//! ```
//!
//! - [`intent`]: the operator's document: services, each with an api, an instance name, a
//!   pastiche artifact, a muster function and a placement. It is validated when it is parsed,
//!   and [`diff`] says what applying it would change.
//! - [`lang`]: the placement language, e.g.
//!   `count 3; where os == "linux" and mem_gb >= 8; distinct host; spread rack`, parsed to a
//!   tree and evaluated against node attributes.
//! - [`place`]: nodes, units of work ([`Unit`]: horde, api, inst, artifact, function) and
//!   their states as deans report them.
//! - [`reconcile()`]: a pure function from (intent, live nodes, observed units) to the
//!   whole set of units each live node should run, plus a doneness per service. It is
//!   level-triggered and stateless: each round starts again from the inputs, so a new leader
//!   computes the same plan. It never moves a running unit off a node that is still eligible,
//!   and it runs a new instance beside the old one until the new one is healthy (live update).
//!
//! The caller compares the plan with what each dean runs, sends every node its whole set
//! (tagged with the leader's term), and calls [`reconcile()`] again on every report or change
//! of membership. Today that caller is the agent (`agent/src/proctor.rs` on the leader,
//! `agent/src/dean.rs` on every node).
//!
//! **Never.** No tokio, no network, no clock, no randomness, no other Crux crate: the same
//! inputs give the same plan (ties broken by node id), so a new leader or a test computes it
//! alike. It never names an executable by itself: a unit carries the artifact and function the
//! intent names, and the dean starts it only if a muster entry in the store names them too.

pub mod intent;
pub mod lang;
pub mod place;
pub mod reconcile;

pub use intent::{diff, parse_intent, Intent, IntentError, ServiceSpec};
pub use lang::{parse, Attrs, CmpOp, Expr, ParseError, Placement, Value};
pub use place::{Node, Unit, UnitState};
pub use reconcile::{reconcile, Doneness, Observed, Plan, ServiceStatus};
