//! Picket: the per-node service runner.
//!
//! Two kinds of services run under picket, both registered with the node's reeve:
//!
//! * [`builtin`]: services compiled into the agent. Each implements [`builtin::Builtin`], whose
//!   `run(quit, alive, network)` follows the seed's `Galumph2_3(quit, alive, network)`: it runs
//!   until `quit` and sends its service points on `alive`; [`builtin::run_builtin`] turns those
//!   messages into reeve registrations and heartbeats, and restarts a failed built-in with
//!   back-off.
//! * [`runner`]: plugin processes (executables from pastiche), started with a go-plugin style
//!   handshake and supervised:
//!
//! ```text
//!  start ──spawn──▶ Starting ──handshake line, health check──▶ Healthy ⇄ Unhealthy
//!                      │                                          │
//!                      └──────────── exit / bad handshake ────────┤
//!                                                                 ▼
//!           Backoff (500 ms, doubling to 30 s) ◀── exits ── N quick exits in a row ──▶ Failed
//!  stop ──▶ Stopping: Plugin.Shutdown(token) ▶ SIGTERM to the group ▶ grace ▶ SIGKILL the group
//! ```
//!
//!   Running children are recorded in `<dir>/children.json`, so an agent that restarts re-adopts
//!   the plugins that kept running.
//! * [`plugin`]: the plugin side of the handshake, for plugin authors: read [`plugin::PluginEnv`],
//!   serve `grpc.health.v1` and `crux.plugin.v1.Plugin` on a Unix socket, print the handshake line,
//!   and wait for the shutdown signal.

pub mod builtin;
pub mod plugin;
mod proc;
mod records;
pub mod runner;
mod spec;

pub use builtin::{run_builtin, Builtin, Fservice, Network};
pub use runner::{Picket, PicketConfig, StopOutcome, UnitState, UnitStatus};
pub use spec::UnitSpec;

/// The protocol version of the plugin handshake (`CRUX_PLUGIN_PROTOCOL`, the first field of the
/// handshake line).
pub const PROTOCOL_VERSION: &str = "1";

/// The metadata key the plugin control calls carry picket's one-time token in.
pub const TOKEN_METADATA: &str = "crux-plugin-token";

/// Milliseconds since the Unix epoch, now (the one place picket reads the wall clock).
#[allow(clippy::disallowed_methods)]
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
