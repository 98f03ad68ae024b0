//! Cross-crate integration tests: multi-process clusters on loopback and simulations.
//!
//! [`cluster`] starts real `crux agent` processes on a loopback range of their own, talks to them
//! through the `crux` CLI (as a person or a script would), and kills only the processes it
//! started. The end-to-end tests that use it live beside the binary, in `agent/tests/`, where
//! cargo builds the `crux` executable for them.

pub mod cluster;
