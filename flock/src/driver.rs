//! tokio driver of the flock core.
