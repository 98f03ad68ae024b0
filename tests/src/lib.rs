//! Cross-crate integration tests: multi-process clusters on loopback and simulations.
