//! Deterministic simulator of many flock nodes on virtual time.
