//! Reeve: the per-node registry agent (local Unix-socket API, heartbeater, steward proxy). Filled in by the registry issue.
