//! Picket: the per-node service runner (built-in services and plugin processes). Filled in by the picket issue.
